"""The reward server's FastAPI app.

Routes: POST /v1/score, GET /v1/rewards (bearer auth), GET /healthz, /readyz, /metrics, and FastAPI's
/openapi.json and /docs. Auth and the body-size limit are checked in an ASGI middleware before the
body is read, so an unauthenticated or oversized request costs no parsing. Every error answer is an
ErrorResponse: {"detail", "kind", "reward"}.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from reward_server.batcher import QueueFullError
from reward_server.metrics import RewardServerMetrics
from reward_server.registry import MODEL_LOADERS, REWARDS
from reward_server.scoring import BadInputError, NotReadyError, RewardFailedError, Scorer, decode_score_item
from reward_server.settings import RewardServerSettings
from services.auth import bearer_matches, load_token
from services.schemas import ErrorResponse, ItemScore, RewardsResponse, ScoreRequest, ScoreResponse

log = logging.getLogger("rcgrpo.reward_server")

PROTECTED_PREFIX = "/v1/"
ROUTES = ("/v1/score", "/v1/rewards", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs")
ERROR_RESPONSES = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "the body cannot be parsed at all (e.g. nested too deeply)"),
        (401, "missing or wrong bearer token"),
        (413, "body over the size limit, or too many items"),
        (422, "the request cannot be scored; `detail` says why"),
        (
            503,
            "queue full, models loading, or a reward could not be computed (kind reward_failed, `reward` "
            "names it); retry after `Retry-After` seconds",
        ),
    )
}
HTTP_ERROR_KINDS = {400: "malformed", 404: "not_found", 405: "not_found"}


def _error(
    status: int, kind: str, detail: str, headers: dict | None = None, reward: str | None = None
) -> JSONResponse:
    body = ErrorResponse(detail=detail, kind=kind, reward=reward).model_dump()
    return JSONResponse(body, status_code=status, headers=headers)


def _served_names_in_schema(schema: dict, served: list[str]) -> None:
    """Make the OpenAPI schema say what the server accepts: reward names are the served ones."""
    request = schema["components"]["schemas"]["ScoreRequest"]["properties"]
    request["rewards"]["anyOf"][0]["items"]["enum"] = served
    request["rewards"]["anyOf"][0]["uniqueItems"] = True  # ScoreRequest's validator refuses repeats
    request["weights"]["anyOf"][0]["propertyNames"] = {"enum": served}


class GuardMiddleware:
    """Per request: metrics, then bearer auth on /v1/ routes, then the body-size limit (413)."""

    def __init__(self, app, token: str | None, max_body_bytes: int, metrics: RewardServerMetrics):
        self.app = app
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        start = time.perf_counter()
        status = 500

        async def send_counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_counted)
        finally:
            self.metrics.requests.labels(route=route, status=str(status)).inc()
            self.metrics.request_latency.labels(route=route).observe(time.perf_counter() - start)

    async def _guarded(self, scope, receive, send):
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.token is not None and scope["path"].startswith(PROTECTED_PREFIX):
            if not bearer_matches(headers.get("authorization"), self.token):
                self.metrics.errors.labels(kind="unauthorized").inc()
                response = _error(
                    401, "unauthorized", "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"}
                )
                return await response(scope, receive, send)
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            return await self._too_large(scope, receive, send)
        # Read the body up to the limit (a chunked body declares no length), then replay it to the app.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_body_bytes:
                return await self._too_large(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        self.metrics.errors.labels(kind="too_large").inc()
        response = _error(
            413, "too_large", f"request body over this server's limit of {self.max_body_bytes} bytes"
        )
        await response(scope, receive, send)


def _validation_detail(error: RequestValidationError) -> str:
    parts = []
    for problem in error.errors()[:10]:
        location = ".".join(str(p) for p in problem.get("loc", ()) if p != "body")
        parts.append(f"{location or 'body'}: {problem.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def create_app(
    settings: RewardServerSettings,
    registry=REWARDS,
    model_loaders=MODEL_LOADERS,
    metrics: RewardServerMetrics | None = None,
) -> FastAPI:
    """Build the app for `settings`. Raises ValueError for a config it cannot serve (unknown reward,
    missing model directory, auth required but no token)."""
    metrics = metrics or RewardServerMetrics()
    scorer = Scorer(settings, metrics, registry, model_loaders)
    token = None
    if not settings.insecure_no_auth:
        secret = settings.token.get_secret_value() if settings.token is not None else None
        token = load_token(secret, settings.token_file)
    if settings.torch_threads is not None:
        import torch

        torch.set_num_threads(settings.torch_threads)
    app = FastAPI(
        title="rcgrpo reward server",
        version="1",
        summary="Typed, batched, authenticated scoring of instruction-guided image edits",
        lifespan=_lifespan,
    )
    app.state.scorer = scorer
    app.state.metrics = metrics
    app.state.settings = settings
    app.state.load_error = None
    app.state.stream_consumer = None
    app.add_middleware(GuardMiddleware, token=token, max_body_bytes=settings.max_body_bytes, metrics=metrics)
    _add_error_handlers(app)
    # the bearer dependency documents the scheme in OpenAPI; the check itself is in GuardMiddleware
    bearer = [Security(HTTPBearer(auto_error=False))] if token is not None else []
    app.include_router(_scoring_routes(scorer, settings, metrics), dependencies=bearer)
    app.include_router(_service_routes(scorer, metrics))
    app.openapi = lambda: _openapi(app)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    """Start the batcher and load the models in the background; on shutdown stop the stream consumer,
    the batcher and the scorer."""
    scorer = app.state.scorer
    await scorer.batcher.start()
    loading = asyncio.create_task(_load_models(app))
    try:
        yield
    finally:
        consumer = app.state.stream_consumer
        if consumer is not None:
            await asyncio.to_thread(consumer.stop)
        loading.cancel()
        await scorer.batcher.stop()
        scorer.close()


async def _load_models(app: FastAPI) -> None:
    """Load the served rewards' models, then start stream mode if configured. A failure leaves the
    process up for inspection, and /readyz says why it is not ready."""
    scorer, settings = app.state.scorer, app.state.settings
    try:
        await asyncio.to_thread(scorer.load_models)
    except Exception as error:
        app.state.load_error = f"{type(error).__name__}: {error}"
        log.exception("loading the reward models failed")
        return
    if settings.stream.enabled:
        from reward_server.stream import StreamConsumer

        try:
            consumer = StreamConsumer(settings.stream, scorer, asyncio.get_running_loop(), app.state.metrics)
            await asyncio.to_thread(consumer.start)
        except Exception as error:  # e.g. Redis unreachable: not ready, and readyz says why
            app.state.load_error = f"stream mode: {type(error).__name__}: {error}"
            log.exception("starting stream mode failed")
            return
        app.state.stream_consumer = consumer


def _add_error_handlers(app: FastAPI) -> None:
    """Answer every error as an ErrorResponse with its kind, counted in the errors metric."""
    metrics, settings = app.state.metrics, app.state.settings
    retry = str(settings.batching.retry_after_s)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError):
        metrics.errors.labels(kind="validation").inc()
        return _error(422, "validation", _validation_detail(error))

    @app.exception_handler(BadInputError)
    async def on_bad_input(request: Request, error: BadInputError):
        metrics.errors.labels(kind="bad_input").inc()
        return _error(422, "bad_input", str(error))

    @app.exception_handler(QueueFullError)
    async def on_queue_full(request: Request, error: QueueFullError):
        metrics.errors.labels(kind="queue_full").inc()
        return _error(503, "queue_full", str(error), {"Retry-After": str(error.retry_after_s)})

    @app.exception_handler(NotReadyError)
    async def on_not_ready(request: Request, error: NotReadyError):
        metrics.errors.labels(kind="not_ready").inc()
        return _error(503, "not_ready", app.state.load_error or str(error), {"Retry-After": retry})

    @app.exception_handler(RewardFailedError)
    async def on_reward_failed(request: Request, error: RewardFailedError):
        metrics.errors.labels(kind="reward_failed").inc()
        log.warning("%s", error)
        return _error(503, "reward_failed", str(error), {"Retry-After": retry}, reward=error.reward)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException):
        kind = HTTP_ERROR_KINDS.get(error.status_code, "malformed" if error.status_code < 500 else "internal")
        metrics.errors.labels(kind=kind).inc()
        return _error(error.status_code, kind, str(error.detail), getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def on_internal_error(request: Request, error: Exception):
        metrics.errors.labels(kind="internal").inc()
        log.exception("internal error on %s", request.url.path, exc_info=error)
        return _error(500, "internal", f"internal error: {type(error).__name__}")


def _scoring_routes(
    scorer: Scorer, settings: RewardServerSettings, metrics: RewardServerMetrics
) -> APIRouter:
    """The authenticated API: score edits, list the served rewards."""
    router = APIRouter(responses=ERROR_RESPONSES)

    @router.post("/v1/score", response_model=ScoreResponse)
    async def score(request: ScoreRequest) -> ScoreResponse:
        """Score a batch of edits: per item, every chosen reward's sub-score and the weighted total."""
        if len(request.items) > settings.max_items_per_request:
            metrics.errors.labels(kind="too_large").inc()
            detail = (
                f"{len(request.items)} items, over this server's limit of {settings.max_items_per_request}"
            )
            return _error(413, "too_large", detail)
        chosen = scorer.choose(request.rewards, request.weights)
        composition = request.composition or scorer.composition
        scorer.check_composition(composition, chosen)
        with scorer.expecting(chosen):
            items = await asyncio.to_thread(
                lambda: [
                    decode_score_item(w, i, settings.max_image_pixels) for i, w in enumerate(request.items)
                ]
            )
        scored = await scorer.score(items, chosen, source="http", composition=composition)
        results = [
            ItemScore(
                group_id=w.group_id,
                candidate_index=w.candidate_index,
                policy_version=w.policy_version,
                scores=s.scores,
                total=s.total,
            )
            for w, s in zip(request.items, scored, strict=True)
        ]
        return ScoreResponse(results=results, weights=chosen, composition=composition)

    @router.get("/v1/rewards", response_model=RewardsResponse)
    async def rewards() -> RewardsResponse:
        """The rewards this server serves: names, default weights, the inputs each reads, whether it runs
        a model."""
        return scorer.listing()

    return router


def _service_routes(scorer: Scorer, metrics: RewardServerMetrics) -> APIRouter:
    """What an orchestrator and Prometheus ask, without a token: liveness, readiness, metrics."""
    router = APIRouter()

    @router.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @router.get("/readyz", responses={503: {"description": "models not loaded (yet)"}})
    async def readyz(request: Request):
        load_error = request.app.state.load_error
        if scorer.ready and load_error is None:
            return {"ready": True}
        return JSONResponse({"ready": False, "detail": load_error or "loading models"}, status_code=503)

    @router.get(
        "/metrics",
        response_class=Response,
        responses={
            200: {
                "description": "Prometheus text exposition format",
                "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
            }
        },
    )
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema, saying which reward names this server accepts (built once)."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        _served_names_in_schema(schema, list(app.state.scorer.served))
        app.openapi_schema = schema
    return app.openapi_schema
