"""Reads of stored URIs stay where the operator allowed: `UriPolicy` on its own, the indexing job over a list
of URIs, and the server's image routes over a table whose `uri` column names other places. A local listener
stands where a URI's `endpoint_override` points and must never see a connection."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import httpx
import lancedb
import pyarrow as pa
import pytest
from pydantic import ValidationError
from served_pool import TINY_MODEL, Pool, file_ids, index_folder, start_app, stop_app, write_images

from jobs.index import main as index_main
from magiclens_core import ImageDecodeError
from magiclens_core.images.sources import UriNotAllowed, UriPolicy, image_bytes_or_path, read_uri
from magiclens_core.search.store import ImageTable
from serve_app.config import AppConfig


class Listener:
    """A TCP server on 127.0.0.1 that counts connections and answers each with an HTTP 404."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            with connection:
                connection.recv(65536)
                connection.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    def uri(self, key: str = "key.png") -> str:
        return f"s3://bucket/{key}?endpoint_override=127.0.0.1:{self.port}&scheme=http"

    def close(self) -> None:
        self.server.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self.server.close()
        self.thread.join(timeout=5)


@pytest.fixture
def listener():
    server = Listener()
    yield server
    server.close()


def test_an_endpoint_override_makes_no_connection(listener):
    policy = UriPolicy.allowing(["s3://bucket"])
    with pytest.raises(UriNotAllowed, match="query string"):
        policy.read(listener.uri())
    with pytest.raises(ImageDecodeError) as refused:
        image_bytes_or_path(listener.uri(), policy)
    assert refused.value.reason == "uri_not_allowed"
    assert listener.connections == 0
    with pytest.raises(FileNotFoundError):  # the unrestricted reader (for places the operator names) does connect
        read_uri(listener.uri())
    assert listener.connections >= 1


def test_local_reads_stay_under_the_allowed_folders(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "sub").mkdir(parents=True)
    outside.mkdir()
    (allowed / "sub" / "good.png").write_bytes(b"good")
    (outside / "secret.png").write_bytes(b"secret")
    (allowed / "link.png").symlink_to(outside / "secret.png")
    (allowed / "inner.png").symlink_to(allowed / "sub" / "good.png")
    os.mkfifo(allowed / "pipe.png")
    policy = UriPolicy.allowing([str(allowed)])

    assert policy.read(str(allowed / "sub" / "good.png")) == b"good"
    assert policy.read((allowed / "sub" / "good.png").as_uri()) == b"good"
    assert policy.read(str(allowed / "inner.png")) == b"good"  # a link that stays inside
    assert policy.read(str(allowed / "sub" / ".." / "sub" / "good.png")) == b"good"
    for uri in (str(outside / "secret.png"), (outside / "secret.png").as_uri(), "/etc/passwd", "file:///etc/passwd",
                f"{allowed}/../outside/secret.png", f"{allowed}/sub/../../outside/secret.png",
                str(allowed / "link.png"), f"file://localhost{allowed}/sub/good.png",
                f"{(allowed / 'sub' / 'good.png').as_uri()}?x=1", str(tmp_path / "allowed_twin" / "x.png")):
        with pytest.raises(UriNotAllowed):
            policy.read(uri)
    with pytest.raises(OSError, match="not a regular file"):  # never blocks on a FIFO
        policy.read(str(allowed / "pipe.png"))
    with pytest.raises(UriNotAllowed):
        UriPolicy().read(str(allowed / "sub" / "good.png"))  # the empty policy allows nothing
    assert image_bytes_or_path(b"bytes", UriPolicy()) == b"bytes"  # bytes need no read


def test_remote_prefixes_are_folders_and_uris_carry_no_options():
    policy = UriPolicy.allowing(["s3://bucket/photos/", "gs://other"])
    assert policy.check("s3://bucket/photos/a b.jpg") == "s3://bucket/photos/a%20b.jpg"
    assert policy.check("s3://bucket/photos/2024/a.jpg") == "s3://bucket/photos/2024/a.jpg"
    assert policy.check("gs://other/any/key.png") == "gs://other/any/key.png"
    for uri in ("s3://bucket/photos2/a.jpg", "s3://bucket/a.jpg", "s3://elsewhere/photos/a.jpg",
                "gs://bucket/photos/a.jpg", "s3://bucket/photos/../private/a.jpg",
                "s3://bucket/photos/%2E%2E/private/a.jpg", "s3://key:secret@bucket/photos/a.jpg",
                "s3://bucket/photos/a.jpg?region=x", "s3://bucket/photos/a.jpg#x", "hdfs://bucket/photos/a.jpg",
                "mock://bucket/photos/a.jpg", "/etc/passwd"):
        with pytest.raises(UriNotAllowed):
            policy.check(uri)
    for prefix in ("s3://bucket?endpoint_override=127.0.0.1:1", "s3://key:secret@bucket", "mock://bucket"):
        with pytest.raises(UriNotAllowed):
            UriPolicy.allowing([prefix])
    assert policy.prefixes() == ["gs://other", "s3://bucket/photos"]


def test_the_server_reads_no_stored_uri_unless_configured(tmp_path):
    config = AppConfig(model="m", db="d", table="t")
    assert config.allowed_uri_prefixes == () and not config.uri_policy()
    allowed = AppConfig(model="m", db="d", table="t", allowed_uri_prefixes=[str(tmp_path), "s3://bucket/photos"])
    assert allowed.uri_policy().check(str(tmp_path / "a.png")) == str(tmp_path.resolve() / "a.png")
    with pytest.raises(ValidationError, match="query string"):
        AppConfig(model="m", db="d", table="t", allowed_uri_prefixes=["s3://b?endpoint_override=127.0.0.1:1"])


def _outside_image(tmp_path: Path) -> Path:
    return write_images(tmp_path / "outside", 1, start=300)[0]


def test_the_index_job_reads_only_allowed_uris(ray_cluster, tmp_path, listener):
    source = tmp_path / "source"
    good = write_images(source / "images", 2)
    secret = _outside_image(tmp_path)
    listing = source / "images.txt"
    listing.write_text("\n".join([
        "images/" + good[0].name, good[1].as_uri(),  # inside the list's folder: read
        str(secret), secret.as_uri(), f"{source}/../outside/{secret.name}", listener.uri(), "file:///etc/hostname",
    ]))
    db = tmp_path / "db"
    arguments = ["--images", str(listing), "--model", str(TINY_MODEL), "--db", str(db), "--table", "pool"]
    summary = index_main(arguments)
    assert summary["rows_added"] == 2 and summary["rejected"] == 5
    assert summary["allowed_uri_prefixes"] == [str(source.resolve())]
    rejects = lancedb.connect(str(db)).open_table("pool_rejects").to_arrow().to_pylist()
    assert {row["reason"] for row in rejects} == {"uri_not_allowed"} and len(rejects) == 5
    assert listener.connections == 0

    again = index_main([*arguments, "--allow-uri-prefix", str(tmp_path / "outside")])
    assert again["rows_added"] == 1 and again["duplicates"] == 2  # the secret image, named three ways
    assert again["rejected"] == 2 and listener.connections == 0


@pytest.fixture(scope="module")
def served_with_foreign_uris(ray_cluster, tmp_path_factory):
    """A served table whose `uri` column also names places outside its images folder."""
    root = tmp_path_factory.mktemp("foreign_uris")
    paths = write_images(root / "images", 3)
    db = str(root / "db")
    assert index_folder(root / "images", db, "pool")["rows_added"] == 3
    secret = _outside_image(root)
    (root / "images" / "link.png").symlink_to(secret)
    listener = Listener()
    table = ImageTable.open(db, "pool")
    template = table.head(1).to_pylist()[0]
    foreign = {"endpoint": listener.uri(), "absolute": str(secret), "file_uri": secret.as_uri(),
               "traversal": f"{root}/images/../outside/{secret.name}", "link": str(root / "images" / "link.png"),
               "system": "file:///etc/passwd"}
    table.add(pa.Table.from_pylist([{**template, "id": image_id, "uri": uri} for image_id, uri in foreign.items()]))
    url = start_app(Pool(db=db, table="pool", files=file_ids(paths)), {},
                    {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}})
    yield url, file_ids(paths), foreign, listener
    stop_app()
    listener.close()


def test_the_server_answers_404_for_stored_uris_outside_its_folders(served_with_foreign_uris):
    url, files, foreign, listener = served_with_foreign_uris
    own = next(iter(files))
    assert httpx.get(f"{url}/v1/images/{own}", timeout=60).status_code == 200
    assert httpx.post(f"{url}/v1/search", json={"image_id": own, "k": 2}, timeout=120).status_code == 200
    for image_id in foreign:
        answer = httpx.get(f"{url}/v1/images/{image_id}", timeout=60)
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "uri_not_allowed", answer.text
        answer = httpx.post(f"{url}/v1/search", json={"image_id": image_id, "k": 2}, timeout=120)
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "uri_not_allowed", answer.text
    assert listener.connections == 0
