"""A local HTTP server on 127.0.0.1 with the misbehaviours an image fetcher meets on the web."""

from __future__ import annotations

import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from mine_corpus import png

GIF_PIXEL = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00,"
             b"\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024  # many concurrent clients connect at once
    daemon_threads = True


class WebServer:
    """`url(path)`; `hits` counts requests per path; `images` maps `/img/NAME` paths to bytes served."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.images: dict[str, bytes] = {}
        self.pages: dict[str, str] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def send(self, status: int, body: bytes, kind: str = "image/png", **headers: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers.items():
                    self.send_header(name.replace("_", "-"), value)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802
                path = self.path
                server.hits[path] += 1
                try:
                    server.route(self, path.split("?", 1)[0])
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def route(self, handler, path: str) -> None:
        if path in self.images:
            handler.send(200, self.images[path])
        elif path in self.pages:
            handler.send(200, self.pages[path].encode(), "text/html")
        elif path == "/img/red.png":
            handler.send(200, png(64, 64))
        elif path == "/slow.png":
            time.sleep(3)
            handler.send(200, png(64, 64))
        elif path in ("/endless.png", "/trickle.png"):
            handler.send_response(200)
            handler.send_header("Content-Type", "image/png")
            handler.end_headers()
            handler.wfile.write(png(8, 8)[:16])
            while True:
                handler.wfile.write(b"\0" * (65536 if path == "/endless.png" else 1))
                if path == "/trickle.png":
                    time.sleep(0.1)
        elif path == "/big.png":
            handler.send(200, png(64, 64) + b"\0" * 3_000_000)
        elif path == "/fake.jpg":
            handler.send(200, b"<html>not a picture</html>", "image/jpeg")
        elif path == "/flaky.png":
            if self.hits[path] == 1:
                handler.send(429, b"slow down", "text/plain", Retry_After="0")
            else:
                handler.send(200, png(64, 64, (40, 40, 200)))
        elif path == "/down.png":
            handler.send(503, b"unavailable", "text/plain")
        elif path == "/noai.png":
            handler.send(200, png(64, 64), X_Robots_Tag="noimageai")
        elif path == "/redirect-private.png":
            handler.send(302, b"", "text/plain", Location="http://169.254.169.254/latest/meta-data")
        elif path == "/redirect-ok.png":
            handler.send(301, b"", "text/plain", Location="/img/red.png")
        elif path in ("/pixel.gif", "/img/1.gif"):
            handler.send(200, GIF_PIXEL, "image/gif")
        else:
            handler.send(404, b"not found", "text/plain")

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
