"""What Serve's HTTP proxy answers when a replica is lost mid-request: the API's JSON 503 with `Retry-After`,
instead of the proxy's plain-text 500.

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
RETRY_AFTER_S = 1
logger = logging.getLogger("ray.serve")


def unavailable_body(message: str) -> bytes:
    """The API's error body for a request no replica answered."""
    return json.dumps({"error": {"code": "unavailable", "message": message, "details": None}}).encode()


class UnansweredAsUnavailable:
    """ASGI middleware: an HTTP request the wrapped app finished (or failed) without starting a response gets a
    JSON 503 with `Retry-After`; everything else passes through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            if started:
                raise
            logger.warning("no replica answered %s %s", scope.get("method"), scope.get("path"), exc_info=True)
        if not started:
            body = unavailable_body("the replica answering this request was lost; retry it")
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(RETRY_AFTER_S).encode())]})
            await send({"type": "http.response.body", "body": body})


def middlewares() -> list[Middleware]:
    """The proxy middlewares (the callback `PROXY_CALLBACK` names)."""
    return [Middleware(UnansweredAsUnavailable)]
