"""The proxy middleware: what Serve's own proxy code sends when a replica is lost or a request times out
becomes the API's JSON 503 with `Retry-After`; answers the application started pass through untouched."""

from __future__ import annotations

import asyncio
import json

import pytest
from ray.serve._private.http_util import get_http_response_status, send_http_response_on_exception

from serve_app.proxy_errors import RETRY_AFTER_S, UnansweredAsUnavailable

SCOPE = {"type": "http", "method": "POST", "path": "/v1/search"}


def answer_of(app) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) that the middleware around `app` sends for one request."""
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    asyncio.run(UnansweredAsUnavailable(app)(SCOPE, receive, send))
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert len(starts) == 1, sent
    headers = {key.decode(): value.decode() for key, value in starts[0]["headers"]}
    return starts[0]["status"], headers, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def proxy_failing_with(error: BaseException):
    """An ASGI app sending what Serve's proxy sends when handling a request raises `error` before any answer."""
    async def app(scope, receive, send) -> None:
        for message in send_http_response_on_exception(get_http_response_status(error, 8.0, "request-1"), False):
            await send(message)
    return app


def assert_unavailable(answer: tuple[int, dict[str, str], bytes], says: str) -> None:
    status, headers, body = answer
    assert status == 503 and headers["retry-after"] == str(RETRY_AFTER_S)
    assert headers["content-type"] == "application/json" and int(headers["content-length"]) == len(body)
    error = json.loads(body)["error"]
    assert error["code"] == "unavailable" and says in error["message"]


def test_the_proxy_timeout_becomes_the_json_503():
    assert_unavailable(answer_of(proxy_failing_with(TimeoutError())), "request timeout")


def test_a_lost_replica_becomes_the_json_503_not_the_proxys_500():
    assert_unavailable(answer_of(proxy_failing_with(RuntimeError("the actor died"))), "was lost")


@pytest.mark.parametrize("error", [RuntimeError("the actor died"), None], ids=["raised", "returned"])
def test_a_request_left_without_an_answer_becomes_the_json_503(error):
    async def app(scope, receive, send) -> None:
        if error is not None:
            raise error
    assert_unavailable(answer_of(app), "was lost")


@pytest.mark.parametrize("status", [200, 404, 429, 500, 503])
def test_answers_the_application_started_pass_untouched(status):
    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": [(b"x-from", b"app")]})
        await send({"type": "http.response.body", "body": b"answer"})
    assert answer_of(app) == (status, {"x-from": "app"}, b"answer")


def test_a_failure_after_the_answer_started_is_not_masked():
    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("lost mid-answer")
    with pytest.raises(RuntimeError, match="lost mid-answer"):
        answer_of(app)
