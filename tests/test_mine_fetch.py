"""The mining fetcher against a real local HTTP server: deadlines, limits, retries, noai, private addresses."""

from __future__ import annotations

import time

import pytest
from mine_corpus import png
from mine_server import WebServer

from magiclens_core.mining.fetch import AddressPolicy, Fetcher, FetchOptions, says_noai, sniff_image_type

LOCAL = ("127.0.0.1/32",)


@pytest.fixture(scope="module")
def server():
    web = WebServer()
    yield web
    web.close()


def options(**overrides) -> FetchOptions:
    values = {"deadline_s": 1.5, "max_bytes": 500_000, "retries": 2, "backoff_s": 0.05, "concurrency": 16,
              "per_host_rate": 200.0, "allow_networks": LOCAL}
    return FetchOptions(**{**values, **overrides})


def test_every_misbehaviour_gets_its_reason(server):
    paths = ["/img/red.png", "/missing.png", "/slow.png", "/endless.png", "/trickle.png", "/big.png", "/fake.jpg",
             "/flaky.png", "/noai.png", "/redirect-private.png", "/redirect-ok.png", "/pixel.gif", "/img/red.png"]
    started = time.monotonic()
    results = Fetcher(options()).fetch([server.url(path) for path in paths])
    elapsed = time.monotonic() - started
    outcome = {path: (result.reason, result.mime) for path, result in zip(paths, results, strict=True)}
    assert outcome == {
        "/img/red.png": (None, "image/png"), "/missing.png": ("http_status", None), "/slow.png": ("deadline", None),
        "/endless.png": ("too_large", None), "/trickle.png": ("deadline", None), "/big.png": ("too_large", None),
        "/fake.jpg": ("not_an_image", None), "/flaky.png": (None, "image/png"), "/noai.png": ("robots_noai", None),
        "/redirect-private.png": ("private_address", None), "/redirect-ok.png": (None, "image/png"),
        "/pixel.gif": (None, "image/gif")}
    assert results[0].data == png(64, 64) and results[-1].data == results[0].data
    assert results[paths.index("/flaky.png")].attempts == 2 and server.hits["/flaky.png"] == 2
    assert "169.254.169.254" in results[paths.index("/redirect-private.png")].detail
    assert server.hits["/img/red.png"] == 2  # once for itself (listed twice), once behind the redirect
    assert elapsed < 5  # the deadline bounds every straggler: the whole batch ends soon after 1.5 s


def test_private_addresses_are_refused_unless_allowed(server):
    refused, = Fetcher(options(allow_networks=())).fetch([server.url("/img/red.png")])
    assert refused.reason == "private_address"
    named, = Fetcher(options(allow_networks=())).fetch([server.url("/img/red.png").replace("127.0.0.1", "localhost")])
    assert named.reason == "private_address" and "resolves to" in named.detail
    allowed, = Fetcher(options(allow_networks=(), allow_private=True)).fetch([server.url("/img/red.png")])
    assert allowed.reason is None
    policy = AddressPolicy()
    assert not any(policy.allows(a) for a in ("10.0.0.1", "192.168.1.1", "169.254.169.254", "::1", "fd00::1",
                                              "100.64.0.1", "::ffff:127.0.0.1", "0.0.0.0"))
    assert policy.allows("93.184.216.34")


def test_retries_are_bounded(server):
    down, missing = Fetcher(options(retries=3)).fetch([server.url("/down.png"), server.url("/missing.png")])
    assert (down.reason, down.detail, down.attempts) == ("http_status", "HTTP 503", 4)
    assert server.hits["/down.png"] == 4
    assert missing.attempts == 1  # a 404 is not retried


def test_rate_per_host_spaces_requests(server):
    started = time.monotonic()
    results = Fetcher(options(per_host_rate=5.0)).fetch([server.url(f"/img/red.png?n={i}") for i in range(6)])
    assert all(result.reason is None for result in results)
    assert time.monotonic() - started >= 1.0  # 6 request starts at 5/s: the last one 1 s after the first


def test_local_files_only_under_the_inputs(tmp_path):
    inside = tmp_path / "in"
    inside.mkdir()
    (inside / "a.png").write_bytes(png(32, 32))
    (tmp_path / "secret.png").write_bytes(png(32, 32))
    (inside / "big.png").write_bytes(png(32, 32) + b"\0" * 600_000)
    fetcher = Fetcher(options(local_roots=(str(inside),)))
    ok, outside, big, missing = fetcher.fetch([(inside / "a.png").as_uri(), (tmp_path / "secret.png").as_uri(),
                                               str(inside / "big.png"), (inside / "none.png").as_uri()])
    assert ok.reason is None and ok.mime == "image/png"
    assert outside.reason == "path_not_allowed"
    assert big.reason == "too_large"
    assert missing.reason == "unreachable"
    nothing, = Fetcher(options()).fetch([(inside / "a.png").as_uri()])
    assert nothing.reason == "path_not_allowed"


def test_sniffing_and_robots_parsing():
    assert sniff_image_type(b"\xff\xd8\xff\xe0rest") == "image/jpeg"
    assert sniff_image_type(b"RIFF1234WEBPVP8 ") == "image/webp"
    assert sniff_image_type(b"<html>") is None
    assert says_noai(["googlebot: noindex, noai"]) and says_noai(["NoImageAI"])
    assert not says_noai(["noindex, nofollow"])
