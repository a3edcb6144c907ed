"""The HTTP API's request and response models, and the checks every query passes before it is embedded.

Every problem with a request becomes an `ApiError`: a 4xx status, a short machine-readable `code` and a
message for people, answered as `{"error": {"code", "message", "details"}}`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from magiclens_core.model.instruction_length import MAX_INSTRUCTION_CHARS, instruction_tokens
from magiclens_core.search.filters import ColumnKind, Filter, FilterError, parse_filter
from serve_app.config import AppConfig

FORM_FIELDS = ("image", "image_id", "instruction", "k", "filter")
MAX_ID_CHARS = 512
_JSON_OVERHEAD = 64 * 1024  # room for the other fields of a JSON or multipart body


class ApiError(Exception):
    """A request the API refuses: HTTP `status`, a stable `code`, a message naming the problem."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


class SearchRequest(BaseModel):
    """`POST /v1/search` as JSON: an image (base64) or the id of an indexed image, and an instruction."""

    model_config = ConfigDict(extra="forbid")

    image: str | None = Field(None, description="the query image file, base64 (a `data:...;base64,` prefix is "
                                                "accepted)")
    image_id: str | None = Field(None, min_length=1, max_length=MAX_ID_CHARS,
                                 description="the id of an image in the table, instead of `image`")
    instruction: str = Field("", description="what to change or keep; at most 77 tokens")
    k: int | None = Field(None, description="how many results (default and maximum set by the server)")
    filter: str | None = Field(None, description="metadata filter, e.g. `colour = 'red' AND count >= 2`")

    @field_validator("image", "image_id", "instruction", "filter")
    @classmethod
    def _unicode(cls, text: str | None) -> str | None:
        if text is not None:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise ValueError(f"must be Unicode text; found a lone surrogate at position {err.start}") from None
        return text

    @model_validator(mode="after")
    def _one_image(self) -> SearchRequest:
        if (self.image is None) == (self.image_id is None):
            raise ValueError("give exactly one of `image` (base64) and `image_id`")
        return self


class SearchHit(BaseModel):
    """One result: the image's id, where it is stored, its cosine similarity, and its metadata columns."""

    model_config = ConfigDict(extra="allow")

    id: str
    uri: str | None
    score: float


class SearchResponse(BaseModel):
    results: list[SearchHit]
    took_ms: float = Field(description="time spent in the server, decoding to results")
    batch_size: int = Field(description="queries embedded together with this one")
    table_version: int


class ErrorBody(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorResponse(BaseModel):
    error: ErrorBody


@dataclass(frozen=True)
class CheckedQuery:
    """A search request after the checks: image bytes or an image id, the instruction, k and the filter tree."""

    image: bytes | None
    image_id: str | None
    instruction: str
    k: int
    filter: Filter | None


def body_limit(config: AppConfig) -> int:
    """The largest request body: a base64 image of `max_image_bytes` and the other fields."""
    return (config.max_image_bytes + 2) // 3 * 4 + _JSON_OVERHEAD


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "request_too_large", f"request body of {declared} bytes is over the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "request_too_large", f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _validation_error(err: ValidationError) -> ApiError:
    details = [{"field": ".".join(str(part) for part in error["loc"]), "message": error["msg"]}
               for error in err.errors(include_url=False, include_input=False)]
    summary = "; ".join(f"{d['field'] or 'body'}: {d['message']}" for d in details)
    return ApiError(422, "invalid_request", summary, details)


def decode_base64(text: str, max_bytes: int) -> bytes:
    """The bytes of a base64 string (optionally a `data:` URL); 413 when over `max_bytes`, 400 when invalid."""
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if not head.endswith(";base64"):
            raise ApiError(400, "bad_base64", "a data URL image must be base64-encoded (`data:...;base64,`)")
    text = "".join(text.split())
    if len(text) // 4 * 3 > max_bytes + 2:
        raise ApiError(413, "image_too_large", f"image is over the limit of {max_bytes} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ApiError(400, "bad_base64", f"`image` is not valid base64: {err}") from err
    if len(data) > max_bytes:
        raise ApiError(413, "image_too_large", f"image of {len(data)} bytes is over the limit of {max_bytes}")
    return data


def request_from_json(body: bytes) -> SearchRequest:
    """A JSON body as a `SearchRequest`; 400 for malformed JSON, 422 for a body of the wrong shape (nested
    deeper than the JSON reader goes, or numbers longer than it reads, included)."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(400, "malformed_json", f"body is not valid JSON: {err}") from err
    except RecursionError as err:
        raise ApiError(422, "invalid_request", "body nests deeper than a search request can") from err
    except ValueError as err:  # an integer of more digits than Python converts
        raise ApiError(422, "invalid_request", f"body cannot be read: {err}") from err
    if not isinstance(data, dict):
        raise ApiError(422, "invalid_request", "body must be a JSON object")
    try:
        return SearchRequest.model_validate(data)
    except ValidationError as err:
        raise _validation_error(err) from err


async def _one_chunk(body: bytes) -> AsyncIterator[bytes]:
    yield body


def request_from_form(headers: Headers, body: bytes, max_image_bytes: int) -> tuple[SearchRequest, bytes | None]:
    """A multipart body (an `image` file part, or an `image_id` field, plus the other fields) as a
    `SearchRequest` and the uploaded file's bytes. Blocking (it runs its own event loop): call it off the
    server's event loop."""
    return asyncio.run(_read_form(headers, body, max_image_bytes))


async def _read_form(headers: Headers, body: bytes, max_image_bytes: int) -> tuple[SearchRequest, bytes | None]:
    parser = MultiPartParser(headers, _one_chunk(body), max_files=1, max_fields=len(FORM_FIELDS),
                             max_part_size=_JSON_OVERHEAD)
    try:
        form = await parser.parse()
    except MultiPartException as err:
        raise ApiError(400, "malformed_multipart", f"multipart body cannot be read: {err.message}") from err
    unknown = sorted(set(form.keys()) - set(FORM_FIELDS))
    if unknown:
        raise ApiError(422, "invalid_request", f"unknown form fields {unknown}; expected {list(FORM_FIELDS)}")
    upload = form.get("image")
    image: bytes | None = None
    if isinstance(upload, UploadFile):
        image = await upload.read()
        await upload.close()
    elif upload is not None:
        raise ApiError(422, "invalid_request", "form field `image` must be a file upload")
    if image is not None and len(image) > max_image_bytes:
        raise ApiError(413, "image_too_large", f"image of {len(image)} bytes is over the limit of {max_image_bytes}")
    fields = {name: form.get(name) for name in FORM_FIELDS[1:] if form.get(name) is not None}
    try:
        request = SearchRequest.model_validate({**fields, "image": "" if image is not None else None})
    except ValidationError as err:
        raise _validation_error(err) from err
    return request, image


class QueryChecker:
    """Turns a request body into a `CheckedQuery` under the configured limits, or raises `ApiError`."""

    def __init__(self, config: AppConfig) -> None:
        self.config = config

    def read(self, content_type: str, headers: Headers, body: bytes, columns: dict[str, ColumnKind]) -> CheckedQuery:
        """The checked query of a JSON or multipart body. Blocking (parsing, tokenizing, base64): call it off the
        server's event loop."""
        if content_type == "application/json":
            return self.check(request_from_json(body), None, columns)
        return self.check(*request_from_form(headers, body, self.config.max_image_bytes), columns)

    def check(self, request: SearchRequest, image: bytes | None, columns: dict[str, ColumnKind]) -> CheckedQuery:
        """The query of a `SearchRequest` (and the uploaded image's bytes) once every limit is checked."""
        config = self.config
        k = config.default_k if request.k is None else request.k
        if not 1 <= k <= config.max_k:
            raise ApiError(422, "k_out_of_range", f"k must be between 1 and {config.max_k}, got {k}")
        self._check_instruction(request.instruction)
        tree = None
        if request.filter is not None and request.filter.strip():
            try:
                tree = parse_filter(request.filter, columns)
            except FilterError as err:
                raise ApiError(400, err.code, str(err)) from err
        if image is None and request.image is not None:
            image = decode_base64(request.image, config.max_image_bytes)
        return CheckedQuery(image=image, image_id=request.image_id, instruction=request.instruction, k=k, filter=tree)

    def _check_instruction(self, instruction: str) -> None:
        limit = self.config.max_instruction_tokens
        if len(instruction) > MAX_INSTRUCTION_CHARS:
            raise ApiError(422, "instruction_too_long", f"instruction has {len(instruction)} characters, over the "
                                                        f"limit of {MAX_INSTRUCTION_CHARS}")
        tokens, exact = instruction_tokens(instruction, limit)
        if tokens > limit:
            counted = f"{tokens}" if exact else f"at least {tokens}"
            raise ApiError(422, "instruction_too_long", f"instruction has {counted} tokens (start and end "
                                                        f"included), over the limit of {limit}")
