"""The MagicLens search application: one deployment, `SearchServer`, whose replicas each answer HTTP (FastAPI)
and hold the model (the batched `QueryEncoder`) and the table, so a query costs no hop between replicas.

    serve run serve_app/config.yaml            # or: serve deploy serve_app/config.yaml

Routes: `POST /v1/search`, `GET /v1/images`, `GET /v1/images/{id}`, `GET /v1/info`, `GET /healthz`, the web
page at `/` and the OpenAPI page at `/docs`. With `api_key` configured every `/v1` route needs
`Authorization: Bearer <key>`.
"""


import dataclasses
import hmac
import io
import logging
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from magiclens_core import ImageDecodeError
from magiclens_core.images.sources import load_image_source
from serve_app.config import AppConfig
from serve_app.encoder import QueryEncoder, image_error
from serve_app.health import STUCK_AFTER_S, WorkerThreads
from serve_app.live_table import LiveTable
from serve_app.proxy_errors import RETRY_AFTER_S
from serve_app.schemas import (
    ApiError,
    CheckedQuery,
    ErrorResponse,
    QueryChecker,
    SearchRequest,
    SearchResponse,
    body_limit,
    read_body,
)
from serve_app.timing import Stopwatch, server_timing

PAGE = Path(__file__).parent / "static" / "index.html"
LISTING_LIMIT = 200
MAX_OFFSET = 2**63 - 1
logger = logging.getLogger("ray.serve")

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 415, 422, 503)}

api = FastAPI(title="MagicLens search",
              description="Instruction-conditioned image retrieval: an image and an instruction in, images out.")


def authorize(request: Request) -> None:
    """Refuse the request (401) unless it carries the configured bearer key; no key configured: open."""
    expected = request.app.state.api_key
    if expected is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise ApiError(401, "unauthorized", "this route needs `Authorization: Bearer <api key>`")


@api.exception_handler(ApiError)
async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    headers = {401: {"WWW-Authenticate": "Bearer"}, 503: {"Retry-After": str(RETRY_AFTER_S)}}.get(err.status)
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
    details = [{"field": ".".join(str(part) for part in e["loc"]), "message": e["msg"]} for e in err.errors()]
    message = "; ".join(f"{d['field']}: {d['message']}" for d in details)
    return JSONResponse(ApiError(422, "invalid_request", message, details).body(), status_code=422)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
    return JSONResponse(ApiError(err.status_code, code, str(err.detail)).body(), status_code=err.status_code,
                        headers=getattr(err, "headers", None))


@api.exception_handler(Exception)
async def _unexpected(request: Request, err: Exception) -> JSONResponse:
    logger.exception("unexpected error answering %s %s", request.method, request.url.path)
    return JSONResponse(ApiError(500, "internal", f"unexpected {type(err).__name__}; see the server log").body(),
                        status_code=500)


_SEARCH_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": SearchRequest.model_json_schema()},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "image": {"type": "string", "format": "binary"}, "image_id": {"type": "string"},
        "instruction": {"type": "string"}, "k": {"type": "integer"}, "filter": {"type": "string"}}}},
}}}


@serve.deployment(
    name="SearchServer",
    max_ongoing_requests=64,
    autoscaling_config={"min_replicas": 2, "max_replicas": 3, "target_ongoing_requests": 8},
    health_check_period_s=2,
    health_check_timeout_s=10,
    ray_actor_options={"num_cpus": 0.5},
    logging_config={"enable_access_log": False},  # a log line per request costs time; errors are still logged
)
@serve.ingress(api)
class SearchServer:
    """HTTP in, checks, decode, batched embedding and the table search, all in one replica."""

    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self.threads = WorkerThreads(max(STUCK_AFTER_S, 2 * config.search_timeout_s))
        self.live = LiveTable(config.db, config.table, config.refresh_interval_s, config.memory_index)
        self.encoder = QueryEncoder(config, self.live, self.threads)
        self.checker = QueryChecker(config)
        self.policy = config.uri_policy()
        self.page = PAGE.read_text()
        api.state.api_key = config.api_key

    async def _read_query(self, request: Request) -> CheckedQuery:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in ("application/json", "multipart/form-data"):
            raise ApiError(415, "unsupported_media_type",
                           "send application/json or multipart/form-data (an `image` file part)")
        body = await read_body(request, body_limit(self.config))
        await self.live.fresh()
        return await self.threads.run(self.checker.read, content_type, request.headers, body,
                                      self.live.filter_columns)

    @api.post("/v1/search", response_model=SearchResponse, responses=ERRORS, openapi_extra=_SEARCH_BODY,
              dependencies=[Depends(authorize)])
    async def search(self, request: Request, response: Response) -> dict[str, Any]:
        """The k images that best match an image (base64, an upload, or an indexed `image_id`) changed as the
        instruction says, best first, with cosine scores and metadata; optional `filter` on metadata. The
        `Server-Timing` header says where the time went: `read` (body and checks), `decode`, `embed` (the wait
        for a batch included), `search` (the table) and `server` (all)."""
        clock = Stopwatch()
        query = await self._read_query(request)
        clock.lap("read")
        answer = await self.encoder.search(query, clock)
        timings = clock.laps_ms(total="server")
        response.headers["Server-Timing"] = server_timing(timings)
        return {**answer, "took_ms": timings["server"]}

    @api.get("/v1/images", responses=ERRORS, dependencies=[Depends(authorize)])
    async def list_images(self, limit: int = Query(24, ge=1, le=LISTING_LIMIT),
                          offset: int = Query(0, ge=0, le=MAX_OFFSET)) -> dict[str, Any]:
        """A page of the table's images (ids, uris and metadata), in storage order, and the table's size."""
        table = await self.live.fresh()
        total = await self.threads.run(table.count)
        rows = []
        if offset < total:
            rows = (await self.threads.run(table.head, limit, offset, self.live.result_columns)).to_pylist()
        return {"images": rows, "total": total, "offset": offset}

    @api.get("/v1/images/{image_id}", responses={**ERRORS, 200: {"content": {"image/jpeg": {}}}},
             response_class=Response, dependencies=[Depends(authorize)])
    async def image(self, image_id: str, side: int | None = Query(None, ge=16, le=2048)) -> Response:
        """The image the table names by this id, as a JPEG whose longest side is at most `side` pixels (404
        `uri_not_allowed` when its stored uri is outside `allowed_uri_prefixes`)."""
        uri = await self.live.image_uri(image_id)
        data = await self.threads.run(self._thumbnail, uri, side or self.config.thumbnail_side)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    def _thumbnail(self, uri: str, side: int) -> bytes:
        try:
            image = load_image_source(uri, self.policy, max_pixels=self.config.max_pixels)
        except ImageDecodeError as err:
            raise image_error(err) from err
        image.thumbnail((side, side), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=90)
        return out.getvalue()

    @api.get("/v1/info", dependencies=[Depends(authorize)])
    async def info(self) -> dict[str, Any]:
        """The model, the table (rows, version, search parameters, filterable columns) and the limits."""
        table = await self.live.fresh()
        encoder = self.encoder.info()
        rows = await self.threads.run(table.count)
        return {"model": encoder, "table": {"name": table.name, "rows": rows, "version": table.version,
                                            "search": dataclasses.asdict(self.live.params),
                                            "filter_columns": self.live.filter_columns},
                "limits": {"default_k": self.config.default_k, "max_k": self.config.max_k,
                           "max_image_bytes": self.config.max_image_bytes, "max_pixels": self.config.max_pixels,
                           "max_instruction_tokens": self.config.max_instruction_tokens},
                "auth": self.config.api_key is not None}

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        """Liveness: answers without a key."""
        return {"status": "ok"}

    async def check_health(self) -> None:
        """Serve's health check: it runs on the replica's event loop, so a blocked loop fails it by Serve's
        timeout, and it fails when a worker thread is stuck on one call."""
        self.threads.check()

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(self.page)


def application(config: AppConfig, options: dict[str, Any] | None = None) -> serve.Application:
    """The application over `config`, with deployment options (`.options(...)` keywords) overriding the
    defaults above, as the `deployments:` section of a Serve config file does."""
    return SearchServer.options(**(options or {})).bind(config)


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application for `serve run` / `serve deploy` (`import_path: serve_app.app:build_app`); `args` are
    `AppConfig` fields. A missing model or table stops the deployment here, with one message, instead of
    replicas failing one after another."""
    config = AppConfig.model_validate(args)
    missing = config.missing_sources()
    if missing:
        raise ValueError("cannot serve: " + "; ".join(missing))
    return application(config)
