"""The Python client against the real application (with an API key): every image form, the key, and batches
that keep input order and survive transient failures injected by a flaky proxy in front of the server."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from PIL import Image
from served_pool import API_KEY as KEY
from served_pool import free_port

from serve_app.client import BatchSearchError, MagicLensClient, SearchError


def test_search_takes_a_path_bytes_a_pil_image_or_an_id(keyed_app):
    pool, url = keyed_app
    image_id, path = list(pool.files.items())[2]
    with MagicLensClient(url, api_key=KEY) as client:
        for image in (path, str(path), path.read_bytes(), Image.open(path)):
            hits = client.search(image, "", k=4)
            assert [hit["id"] for hit in hits][0] == image_id and len(hits) == 4
            assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert client.search(image_id=image_id, k=3)[0]["id"] == image_id
        filtered = client.search(path, k=3, filter=f"id != '{image_id}'")
        assert image_id not in [hit["id"] for hit in filtered]
        answer = client.search_response(path, "in red", k=2)
        assert answer["batch_size"] >= 1 and answer["took_ms"] > 0 and len(answer["results"]) == 2


def test_the_api_key_guards_every_v1_route_but_not_health(keyed_app):
    pool, url = keyed_app
    image_id, path = next(iter(pool.files.items()))
    for key in (None, "wrong-key"):
        with MagicLensClient(url, api_key=key) as client, pytest.raises(SearchError) as caught:
            client.search(path, "", k=3)
        assert caught.value.status == 401 and caught.value.code == "unauthorized"
    for route in ("/v1/images", f"/v1/images/{image_id}", "/v1/info"):
        assert httpx.get(url + route, timeout=60).status_code == 401
        assert httpx.get(url + route, headers={"Authorization": f"Bearer {KEY}"}, timeout=60).status_code == 200
    assert httpx.get(url + "/healthz", timeout=60).status_code == 200
    assert httpx.get(url + "/", timeout=60).status_code == 200  # the page holds no data; it asks for the key


def test_a_refused_query_is_not_retried(keyed_app):
    pool, url = keyed_app
    with MagicLensClient(url, api_key=KEY) as client, pytest.raises(SearchError) as caught:
        client.search(b"not an image", "", retries=3)
    assert caught.value.status == 422 and caught.value.code == "not_an_image"


def test_search_batch_keeps_input_order_and_shows_progress(keyed_app, capfd):
    pool, url = keyed_app
    items = list(pool.files.items())
    queries, expected = [], []
    for turn in range(40):
        image_id, path = items[(turn * 7) % len(items)]
        form = turn % 4
        queries.append((path, "") if form == 0 else (path.read_bytes(), "") if form == 1
                       else {"image": Image.open(path)} if form == 2 else {"image_id": image_id, "k": 2})
        expected.append(image_id)
    with MagicLensClient(url, api_key=KEY) as client:
        results = client.search_batch(queries, k=3, concurrency=8)
    assert [hits[0]["id"] for hits in results] == expected
    assert [len(hits) for hits in results] == [2 if turn % 4 == 3 else 3 for turn in range(40)]
    assert "40/40" in capfd.readouterr().err


class FlakyProxy:
    """A real HTTP proxy in front of the application that answers some requests with 503 or drops the
    connection without answering, to exercise the client's retries."""

    def __init__(self, target: str, fail_every: int = 3) -> None:
        self.target, self.fail_every = target, fail_every
        self.requests = self.failures = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with proxy.lock:
                    proxy.requests += 1
                    turn = proxy.requests
                if turn % proxy.fail_every == 0:
                    with proxy.lock:
                        proxy.failures += 1
                    if turn % (2 * proxy.fail_every) == 0:
                        self.close_connection = True  # dropped: the client sees a transport error
                        self.connection.close()
                        return
                    self.send_response(503)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(b'{"error": {"code": "unavailable", "message": "try again"}}')
                    return
                answer = httpx.post(proxy.target + self.path, content=body, timeout=120,
                                    headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
                self.send_response(answer.status_code)
                self.send_header("Content-Type", answer.headers["content-type"])
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_search_batch_retries_transient_failures_and_reports_lasting_ones(keyed_app):
    pool, url = keyed_app
    proxy = FlakyProxy(url)
    try:
        items = list(pool.files.items())[:12]
        with MagicLensClient(proxy.url, api_key=KEY) as client:
            results = client.search_batch([(path, "") for _, path in items], k=2, concurrency=4, retries=6,
                                          progress=False)
            assert [hits[0]["id"] for hits in results] == [image_id for image_id, _ in items]
            assert proxy.failures >= 4
            queries = [(path, "") for _, path in items[:5]]
            queries[3] = (b"not an image", "")
            with pytest.raises(BatchSearchError) as caught:
                client.search_batch(queries, k=2, concurrency=2, retries=6, progress=False)
        error = caught.value
        assert list(error.errors) == [3] and error.errors[3].code == "not_an_image"
        assert [hits[0]["id"] if hits else None for hits in error.results] == \
            [items[0][0], items[1][0], items[2][0], None, items[4][0]]
    finally:
        proxy.close()


def test_an_unreachable_server_fails_after_the_retries():
    with MagicLensClient(f"http://127.0.0.1:{free_port()}", timeout=5) as client, pytest.raises(SearchError) as caught:
        client.search(b"x", "", retries=1)
    assert caught.value.status is None and caught.value.code == "transport"
