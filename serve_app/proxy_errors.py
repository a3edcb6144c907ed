"""What Serve's HTTP proxy answers when no replica answers a request: the API's JSON 503 with `Retry-After`,
instead of the proxy's plain-text 500 (the replica holding it was lost) or 408 (nothing answered within
`http_options.request_timeout_s`, which also bounds a request that Serve's router leaves queued after the
replica it first chose died).

Serve loads it into every proxy from the environment variable `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`
(`PROXY_CALLBACK` below), which `serve_app/config.yaml` sets on the Serve controller (`controller_options`);
the proxies the controller starts inherit it.
"""

from __future__ import annotations

import json
import logging

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PROXY_CALLBACK = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "serve_app.proxy_errors:middlewares"}
RETRY_AFTER_S = 1  # every 503 of the API, the application's and the proxy's
PROXY_TIMEOUT_STATUS = 408  # what Serve's proxy answers past `request_timeout_s`
logger = logging.getLogger("ray.serve")


def unavailable_body(message: str) -> bytes:
    """The API's error body for a request no replica answered."""
    return json.dumps({"error": {"code": "unavailable", "message": message, "details": None}}).encode()


class UnansweredAsUnavailable:
    """ASGI middleware: an HTTP request the wrapped app finished (or failed) without starting a response, or
    answered with the proxy's request timeout (408: the API answers no 408 of its own), gets a JSON 503 with
    `Retry-After`; everything else passes through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = timed_out = False

        async def tracking_send(message: Message) -> None:
            nonlocal started, timed_out
            if message["type"] == "http.response.start" and not started:
                started, timed_out = True, message["status"] == PROXY_TIMEOUT_STATUS
            if not timed_out:  # the proxy's own timeout answer is replaced below
                await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            if started and not timed_out:
                raise
            logger.warning("no replica answered %s %s", scope.get("method"), scope.get("path"), exc_info=True)
        if timed_out:
            await send_unavailable(send, "no replica answered within the proxy's request timeout; retry it")
        elif not started:
            await send_unavailable(send, "the replica answering this request was lost; retry it")


async def send_unavailable(send: Send, message: str) -> None:
    """Send the JSON 503 `unavailable` with `Retry-After`."""
    body = unavailable_body(message)
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(RETRY_AFTER_S).encode())]})
    await send({"type": "http.response.body", "body": body})


def middlewares() -> list[Middleware]:
    """The proxy middlewares (the callback `PROXY_CALLBACK` names)."""
    return [Middleware(UnansweredAsUnavailable)]
