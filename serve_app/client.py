"""A Python client for the MagicLens search API: one query, or thousands with bounded concurrency and retries.

    from serve_app.client import MagicLensClient

    client = MagicLensClient("http://localhost:8000", api_key=None)
    hits = client.search("house.jpg", "the same building, inside view", k=10)
    results = client.search_batch([("a.jpg", "in red"), {"image_id": "0f3a...", "instruction": "at night"}])
"""

from __future__ import annotations

import base64
import io
import random
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from os import PathLike
from pathlib import Path
from typing import Any

import httpx
from PIL import Image
from tqdm.auto import tqdm

ImageArg = str | PathLike | bytes | Image.Image
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class SearchError(RuntimeError):
    """A query the server refused (`status`, `code`, `message` from its JSON error), or that kept failing."""

    def __init__(self, status: int | None, code: str, message: str) -> None:
        super().__init__(f"{status or 'no answer'} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class BatchSearchError(RuntimeError):
    """Some queries of a batch failed for good; `results` holds every answer (None where it failed) and
    `errors` the failures by query position."""

    def __init__(self, results: list[list[dict] | None], errors: dict[int, SearchError]) -> None:
        first = min(errors)
        super().__init__(f"{len(errors)} of {len(results)} queries failed; query {first}: {errors[first]}")
        self.results = results
        self.errors = errors


def image_bytes(image: ImageArg) -> bytes:
    """An image argument as file bytes: a path is read, bytes pass through, a PIL image is encoded as PNG."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, Image.Image):
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue()
    return Path(image).read_bytes()


class MagicLensClient:
    """Calls `POST /v1/search` of a running application (thread-safe: one connection pool for all threads)."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout,
                                  limits=httpx.Limits(max_connections=256, max_keepalive_connections=256))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> MagicLensClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _body(self, image: ImageArg | None, instruction: str, k: int | None, image_id: str | None,
              filter: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {"instruction": instruction}
        if image_id is not None:
            body["image_id"] = image_id
        if image is not None:
            body["image"] = base64.b64encode(image_bytes(image)).decode("ascii")
        for name, value in (("k", k), ("filter", filter)):
            if value is not None:
                body[name] = value
        return body

    def _post(self, body: dict[str, Any], retries: int, backoff_s: float) -> dict[str, Any]:
        for attempt in range(retries + 1):
            try:
                response = self._http.post("/v1/search", json=body)
            except httpx.TransportError as err:  # connection refused or reset, timeouts
                failure = SearchError(None, "transport", f"{type(err).__name__}: {err}")
            else:
                if response.status_code == 200:
                    return response.json()
                failure = _error_of(response)
                if response.status_code not in RETRY_STATUS:
                    raise failure
            if attempt < retries:
                time.sleep(backoff_s * 2 ** attempt * (0.5 + random.random()))
        raise failure

    def _send(self, arguments: dict[str, Any], retries: int) -> dict[str, Any]:
        try:
            body = self._body(**arguments)
        except OSError as err:
            raise SearchError(None, "unreadable_image", str(err)) from err
        return self._post(body, retries, 0.2)

    def search_response(self, image: ImageArg | None = None, instruction: str = "", k: int | None = None, *,
                        image_id: str | None = None, filter: str | None = None, retries: int = 3,
                        backoff_s: float = 0.2) -> dict[str, Any]:
        """The whole answer of one query: `results`, `took_ms`, `batch_size`, `table_version`."""
        return self._post(self._body(image, instruction, k, image_id, filter), retries, backoff_s)

    def search(self, image: ImageArg | None = None, instruction: str = "", k: int | None = None, *,
               image_id: str | None = None, filter: str | None = None, retries: int = 3) -> list[dict[str, Any]]:
        """The best images for `image` (a path, bytes or PIL image; or `image_id` of an indexed image) changed
        as `instruction` says: dicts with `id`, `uri`, `score` and metadata, best first. Raises `SearchError`."""
        return self.search_response(image, instruction, k, image_id=image_id, filter=filter,
                                    retries=retries)["results"]

    def search_batch(self, queries: Iterable[Sequence | dict[str, Any]], k: int | None = None, *,
                     concurrency: int = 8, retries: int = 5, progress: bool = True) -> list[list[dict[str, Any]]]:
        """Results of many queries, in input order. A query is `(image, instruction)` or a dict of `search`'s
        arguments (`image` or `image_id`, `instruction`, optional `k`, `filter`). Transient failures
        (connection errors, 429, 5xx) are retried with backoff; when some queries still fail, raises
        `BatchSearchError` carrying every other result."""
        arguments = [_query_arguments(query, k) for query in queries]  # images are read when sent
        results: list[list[dict] | None] = [None] * len(arguments)
        errors: dict[int, SearchError] = {}
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool, \
                tqdm(total=len(arguments), desc="queries", unit="q", disable=not progress) as bar:
            futures = {pool.submit(self._send, query, retries): position for position, query in enumerate(arguments)}
            for future in as_completed(futures):
                position = futures[future]
                try:
                    results[position] = future.result()["results"]
                except SearchError as err:
                    errors[position] = err
                bar.update(1)
        if errors:
            raise BatchSearchError(results, errors)
        return results  # type: ignore[return-value]


def _query_arguments(query: Sequence | dict[str, Any], k: int | None) -> dict[str, Any]:
    if isinstance(query, dict):
        unknown = set(query) - {"image", "image_id", "instruction", "k", "filter"}
        if unknown:
            raise ValueError(f"unknown query keys {sorted(unknown)}")
        return {"image": query.get("image"), "instruction": query.get("instruction", ""),
                "k": query.get("k", k), "image_id": query.get("image_id"), "filter": query.get("filter")}
    image, instruction = query
    return {"image": image, "instruction": instruction, "k": k, "image_id": None, "filter": None}


def _error_of(response: httpx.Response) -> SearchError:
    try:
        error = response.json()["error"]
        return SearchError(response.status_code, error["code"], error["message"])
    except (ValueError, KeyError, TypeError):
        return SearchError(response.status_code, "http_error", response.text[:200])
