"""The search application started for real on the session's Ray (`serve.run`) over a table built by the indexing
job, queried over HTTP: known answers, every bad input, new rows, concurrency and batching, autoscaling, and
a replica killed under load."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import ray
from PIL import Image
from ray import serve
from served_pool import APP_NAME, MIN_REPLICAS, file_ids, index_folder, replica_actor_names, wait_for, write_images

from serve_app.client import MagicLensClient, SearchError


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def search(url: str, timeout: float = 120, **body) -> httpx.Response:
    return httpx.post(url + "/v1/search", json=body, timeout=timeout)


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


def server_replicas() -> dict[str, int]:
    deployment = serve.status().applications[APP_NAME].deployments["SearchServer"]
    return {str(getattr(state, "value", state)): count for state, count in deployment.replica_states.items()}


def server_actor_names() -> list[str]:
    return replica_actor_names(APP_NAME, "SearchServer")


def assert_answers(url: str, pool, image_id: str) -> None:
    answer = search(url, image=b64(pool.files[image_id].read_bytes()), instruction="", k=3)
    assert answer.status_code == 200, answer.text
    assert answer.json()["results"][0]["id"] == image_id


def test_an_indexed_image_finds_itself_first(search_app):
    pool, url = search_app
    for image_id, path in list(pool.files.items())[:6]:
        answer = search(url, image=b64(path.read_bytes()), instruction="", k=5)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert len(body["results"]) == 5 and body["took_ms"] > 0 and body["batch_size"] >= 1
        timings = {name: float(duration.removeprefix("dur=")) for name, duration in
                   (part.strip().split(";") for part in answer.headers["server-timing"].split(","))}
        assert list(timings) == ["read", "decode", "embed", "search", "server"]
        parts = timings["read"] + timings["decode"] + timings["embed"] + timings["search"]
        assert timings["server"] == body["took_ms"] >= parts - 0.01 and min(timings.values()) >= 0
        first = body["results"][0]
        assert first["id"] == image_id and first["uri"] == str(path)
        assert first["score"] == pytest.approx(1.0, abs=1e-4)
        assert first["width"] == first["height"] == 64
        scores = [hit["score"] for hit in body["results"]]
        assert scores == sorted(scores, reverse=True)
        assert "vector" not in first


def test_image_id_and_multipart_queries_match_base64(search_app):
    pool, url = search_app
    image_id, path = next(iter(pool.files.items()))
    by_base64 = search(url, image=b64(path.read_bytes()), instruction="in blue", k=4).json()["results"]
    by_id = search(url, image_id=image_id, instruction="in blue", k=4).json()["results"]
    upload = httpx.post(url + "/v1/search", files={"image": ("query.png", path.read_bytes(), "image/png")},
                        data={"instruction": "in blue", "k": "4"}, timeout=120)
    assert upload.status_code == 200, upload.text
    ids = [hit["id"] for hit in by_base64]
    assert [hit["id"] for hit in by_id] == ids == [hit["id"] for hit in upload.json()["results"]]


def test_filter_on_metadata_columns(search_app):
    pool, url = search_app
    image_id, path = next(iter(pool.files.items()))
    other_id, other_path = list(pool.files.items())[1]
    answer = search(url, image_id=image_id, k=5, filter=f"id != '{image_id}' AND width >= 64")
    assert answer.status_code == 200, answer.text
    assert image_id not in [hit["id"] for hit in answer.json()["results"]]
    only = search(url, image_id=image_id, k=5, filter=f"uri IN ('{other_path}', 'x''); DROP TABLE pool; --')")
    assert [hit["id"] for hit in only.json()["results"]] == [other_id]
    assert search(url, image_id=image_id, k=5, filter="width > 64").json()["results"] == []


BAD_REQUESTS = [
    # (description, request keyword arguments for httpx.post, status, error code)
    ("malformed JSON", {"content": b'{"image": ', "headers": {"content-type": "application/json"}}, 400,
     "malformed_json"),
    ("JSON that is not an object", {"json": ["image"]}, 422, "invalid_request"),
    ("bad base64", {"json": {"image": "not base64!"}}, 400, "bad_base64"),
    ("bytes that are not an image", {"json": {"image": b64(b"hello, not an image")}}, 422, "not_an_image"),
    ("an empty image", {"json": {"image": ""}}, 422, "empty"),
    ("a truncated image", {"json": {"image": b64(png(64, 64)[:60])}}, 422, "corrupt"),
    ("an image over the size limit", {"json": {"image": b64(bytes(310_000))}}, 413, "image_too_large"),
    ("a body over the size limit", {"json": {"image": b64(bytes(600_000))}}, 413, "request_too_large"),
    ("an upload over the size limit", {"files": {"image": ("big.png", bytes(400_000))}}, 413, "image_too_large"),
    ("an image over the pixel limit", {"json": {"image": b64(png(2000, 1500))}}, 413, "too_many_pixels"),
    ("an instruction over 77 tokens", {"json": {"image_id": "ID", "instruction": "very " * 80}}, 422,
     "instruction_too_long"),
    ("k of zero", {"json": {"image_id": "ID", "k": 0}}, 422, "k_out_of_range"),
    ("k over the maximum", {"json": {"image_id": "ID", "k": 51}}, 422, "k_out_of_range"),
    ("k that is not a number", {"json": {"image_id": "ID", "k": "ten"}}, 422, "invalid_request"),
    ("an unknown image_id", {"json": {"image_id": "0" * 32}}, 404, "unknown_image_id"),
    ("an image_id with SQL in it", {"json": {"image_id": "x' OR '1'='1"}}, 404, "unknown_image_id"),
    ("an unknown filter column", {"json": {"image_id": "ID", "filter": "colour = 'red'"}}, 400,
     "unknown_filter_column"),
    ("a filter with SQL in it", {"json": {"image_id": "ID", "filter": "width = 1; DROP TABLE pool"}}, 400,
     "bad_filter"),
    ("a filter of the wrong type", {"json": {"image_id": "ID", "filter": "width = 'wide'"}}, 400, "bad_filter"),
    ("neither image nor image_id", {"json": {"instruction": "red"}}, 422, "invalid_request"),
    ("both image and image_id", {"json": {"image": b64(png(8, 8)), "image_id": "ID"}}, 422, "invalid_request"),
    ("an unknown field", {"json": {"image_id": "ID", "colour": "red"}}, 422, "invalid_request"),
    ("another content type", {"content": b"image=1", "headers": {"content-type": "text/plain"}}, 415,
     "unsupported_media_type"),
    ("a malformed multipart body", {"content": b"garbage", "headers": {
        "content-type": "multipart/form-data; boundary=x"}}, 400, "malformed_multipart"),
    ("an unknown form field", {"files": {"picture": ("a.png", png(8, 8))}}, 422, "invalid_request"),
]


@pytest.mark.parametrize("kwargs,status,code", [case[1:] for case in BAD_REQUESTS],
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_input_is_a_clear_4xx_and_the_next_query_still_answers(search_app, kwargs, status, code):
    pool, url = search_app
    image_id = next(iter(pool.files))
    kwargs = json.loads(json.dumps(kwargs).replace('"ID"', json.dumps(image_id))) if "json" in kwargs else kwargs
    answer = httpx.post(url + "/v1/search", timeout=120, **kwargs)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["code"] == code and error["message"]
    assert_answers(url, pool, image_id)


def test_bad_inputs_crashed_no_replica(search_app):
    before = server_actor_names()
    pool, url = search_app
    for _, kwargs, _, _ in BAD_REQUESTS[:8]:
        assert httpx.post(url + "/v1/search", timeout=120, **kwargs).status_code < 500
    assert server_actor_names() == before
    assert_answers(url, pool, next(iter(pool.files)))


def test_images_are_served_by_id_only(search_app):
    pool, url = search_app
    image_id, path = next(iter(pool.files.items()))
    answer = httpx.get(f"{url}/v1/images/{image_id}", params={"side": 32}, timeout=60)
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/jpeg"
    image = Image.open(io.BytesIO(answer.content))
    assert image.format == "JPEG" and max(image.size) == 32
    assert Image.open(io.BytesIO(httpx.get(f"{url}/v1/images/{image_id}", timeout=60).content)).size == (64, 64)
    for name in ("0" * 32, str(path), "..%2F..%2Fetc%2Fpasswd", "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
                 "x'%20OR%20'1'='1"):
        answer = httpx.get(f"{url}/v1/images/{name}", timeout=60)
        assert answer.status_code == 404, (name, answer.text)
        assert answer.json()["error"]["code"] in ("unknown_image_id", "not_found")
    assert httpx.get(f"{url}/v1/images/{image_id}", params={"side": 100_000}, timeout=60).status_code == 422


def test_listing_info_health_docs_and_page(search_app):
    pool, url = search_app
    listing = httpx.get(url + "/v1/images", params={"limit": 5}, timeout=60).json()
    assert len(listing["images"]) == 5 and listing["total"] >= len(pool.files)
    assert {row["id"] for row in listing["images"]} <= set(pool.files)
    info = httpx.get(url + "/v1/info", timeout=60).json()
    assert info["model"]["dim"] == 64 and info["model"]["max_batch_size"] == 8
    assert info["table"]["filter_columns"]["width"] == "number" and info["limits"]["max_k"] == 50
    assert httpx.get(url + "/healthz", timeout=60).json() == {"status": "ok"}
    assert "/v1/search" in httpx.get(url + "/openapi.json", timeout=60).json()["paths"]
    page = httpx.get(url + "/", timeout=60)
    assert page.status_code == 200 and "v1/search" in page.text
    assert httpx.get(url + "/v1/nothing", timeout=60).json()["error"]["code"] == "not_found"


def listing_ids(url: str) -> list[str]:
    return [row["id"] for row in httpx.get(url + "/v1/images", params={"limit": 200}, timeout=60).json()["images"]]


def test_rows_appended_by_an_index_job_become_searchable(search_app):
    pool, url = search_app
    folder = next(iter(pool.files.values())).parent / "appended"  # where the applications may read images
    new = file_ids(write_images(folder, 3, start=500))
    new_id, new_path = next(iter(new.items()))
    before = search(url, image=b64(new_path.read_bytes()), k=3).json()["results"]
    assert new_id not in [hit["id"] for hit in before]
    summary = index_folder(folder, pool.db, pool.table)  # the real job, appending while we serve
    assert summary["rows_added"] == 3
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        results = search(url, image=b64(new_path.read_bytes()), k=3).json()["results"]
        if results[0]["id"] == new_id:
            break
        time.sleep(0.5)
    assert results[0]["id"] == new_id and results[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert new_id in listing_ids(url)


def test_concurrent_clients_get_right_answers_in_batches(search_app):
    pool, url = search_app
    queries = list(pool.files.items())[:16] * 3

    def one(item):
        image_id, path = item
        body = search(url, image=b64(path.read_bytes()), k=3).json()
        return image_id, body["results"][0]["id"], body["batch_size"]

    with ThreadPoolExecutor(16) as workers:
        answers = list(workers.map(one, queries))
    assert all(expected == found for expected, found, _ in answers)
    assert max(batch for _, _, batch in answers) > 1


def _load(url: str, pool, stop: threading.Event, outcomes: list, clients: int,
          retries: int = 0) -> list[threading.Thread]:
    """Clients searching in a loop through the project's client (`retries` of transient failures), recording
    (status, expected first id, first id found)."""
    items = list(pool.files.items())

    def client(offset: int) -> None:
        with MagicLensClient(url, timeout=180) as searcher:
            turn = offset
            while not stop.is_set():
                image_id, path = items[turn % len(items)]
                turn += 1
                try:
                    hits = searcher.search(path.read_bytes(), "", k=3, retries=retries)
                    outcomes.append((200, image_id, hits[0]["id"]))
                except SearchError as err:
                    outcomes.append((err.status, image_id, None))

    threads = [threading.Thread(target=client, args=(offset,), daemon=True) for offset in range(clients)]
    for thread in threads:
        thread.start()
    return threads


def test_a_burst_scales_the_replicas_up_then_back_down(search_app):
    pool, url = search_app
    assert wait_for(lambda: sum(server_replicas().values()) == MIN_REPLICAS, 120), server_replicas()
    stop, outcomes = threading.Event(), []
    threads = _load(url, pool, stop, outcomes, clients=24)
    try:
        scaled_up = wait_for(lambda: server_replicas().get("RUNNING", 0) > MIN_REPLICAS, 240)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=180)
    assert scaled_up, server_replicas()
    assert outcomes and all(status == 200 and found == expected for status, expected, found in outcomes)
    assert wait_for(lambda: sum(server_replicas().values()) == MIN_REPLICAS, 180), server_replicas()


def test_a_replica_killed_under_load_loses_no_query_of_a_retrying_client(search_app):
    """The requests a lost replica held are answered 503 with Retry-After (test_serve_hardening); the
    project's client retries those, so its callers lose nothing."""
    pool, url = search_app
    assert wait_for(lambda: server_replicas().get("RUNNING", 0) >= MIN_REPLICAS, 180), server_replicas()
    victim = server_actor_names()[0]
    stop, outcomes = threading.Event(), []
    threads = _load(url, pool, stop, outcomes, clients=6, retries=5)
    try:
        assert wait_for(lambda: len(outcomes) >= 10, 120)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        served_before = len(outcomes)
        assert wait_for(lambda: len(outcomes) >= served_before + 40, 180)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=180)
    assert wait_for(lambda: victim not in server_actor_names(), 60)
    wrong = [outcome for outcome in outcomes if outcome[0] != 200 or outcome[1] != outcome[2]]
    assert not wrong, wrong[:5]
    assert_answers(url, pool, next(iter(pool.files)))
