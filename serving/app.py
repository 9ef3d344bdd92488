"""The HTTP API (FastAPI + uvicorn). OpenAPI at /docs.

``create_app(settings)`` builds the app; ``uvicorn --factory serving.app:create_app`` (what
``recsys serve`` runs, one process per worker) builds it from the layered settings.

Hot path choices: ``async def`` handlers (no thread-pool hop per request), bodies serialised
with orjson, no response-model validation on the way out, a pure-ASGI middleware for limits
and metrics (Starlette's BaseHTTPMiddleware costs a task per request). Models run on a
per-worker model thread with micro-batching (``serving/recommend.py``).
"""
import hmac
from datetime import datetime, timedelta, timezone
import logging
import os
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Annotated, Any, Awaitable, Callable, Mapping, Optional
from urllib.parse import parse_qsl

import orjson
from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import TypeAdapter, ValidationError
from starlette.exceptions import HTTPException

from serving.schemas import EventIn, EventsAccepted, Health, Problem, Recommendations, SimilarItems

if TYPE_CHECKING:  # pragma: no cover
    from core.config import Settings
    from serving.state import ServingState

log = logging.getLogger("serving")

_EVENTS = TypeAdapter(list[EventIn])
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICRO = timedelta(microseconds=1)
ERRORS = {400: {"model": Problem}, 401: {"model": Problem}, 403: {"model": Problem}, 404: {"model": Problem},
          413: {"model": Problem}, 422: {"model": Problem}}


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json", headers=headers)


def problem(status: int, error: str, detail: Any = None) -> Response:
    return _json({"error": error, "detail": detail}, status)


class ApiError(Exception):
    """A 4xx/5xx with a clear message (rendered as :class:`Problem`)."""

    def __init__(self, status: int, error: str, detail: Any = None, headers: dict[str, str] | None = None):
        super().__init__(error)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers


# ---- pure ASGI middleware: body limit, status counts, latency --------------------------------
ENDPOINTS = (("/v1/recommendations/", "recommendations"), ("/v1/items/", "similar"), ("/v1/events", "events"),
             ("/healthz", "healthz"), ("/readyz", "readyz"), ("/metrics", "metrics"), ("/admin/", "admin"),
             ("/noop", "noop"))


def endpoint_of(path: str) -> str:
    for prefix, name in ENDPOINTS:
        if path.startswith(prefix):
            return name
    return "other"


#: a GET route served by :class:`LimitsAndMetrics` itself: ``(path prefix, handler)``; the handler
#: gets ``(scope, the path's last segment)`` and returns ``(status, body, extra headers)``
FastGet = tuple[str, Callable[[dict, str], Awaitable[tuple[int, bytes, dict[str, str] | None]]]]


class LimitsAndMetrics:
    """Outermost pure-ASGI middleware: body limits, request counts and latency per endpoint, and
    the hottest GET route answered directly (``fast_get``): its handler is the same function the
    framework's route calls, but FastAPI/Starlette's per-request layers (error and exception
    middleware, routing, dependency solving, the Response object) were ~40% of the event loop's
    CPU per recommendation. Anything the fast path does not recognise (another method, a
    path with more segments) goes to the framework as usual."""

    def __init__(self, app: Any, *, max_body: int, fast_get: "FastGet | None" = None):
        self.app = app
        self.max_body = max_body
        self.fast_get = fast_get

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from serving.metrics import metrics

        m = metrics()
        t0 = time.perf_counter()
        name = endpoint_of(scope["path"])
        status_box = [500]

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
            await send(message)

        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                try:
                    too_big = int(value) > self.max_body
                except ValueError:
                    too_big = False
                if too_big:
                    await _send_problem(send, 413, f"request body larger than {self.max_body} bytes")
                    m.requests.labels(endpoint=name, status="413").inc()
                    return
        if self.fast_get is not None and scope["method"] == "GET":
            prefix, handler = self.fast_get
            path = scope["path"]
            root = scope.get("root_path", "")
            if root and path.startswith(root):  # as Starlette's routing sees it
                path = path[len(root):]
            last = path[len(prefix):] if path.startswith(prefix) else ""
            if last and "/" not in last:  # the route's single path segment (Starlette: [^/]+)
                status = 500
                try:
                    status, body, headers = await handler(scope, last)
                    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
                    await send({"type": "http.response.start", "status": status, "headers": raw})
                    await send({"type": "http.response.body", "body": body})
                finally:
                    m.record(m.child("requests", name, str(status)))
                    m.record(m.child("latency", name), time.perf_counter() - t0)
                return
        seen = [0]

        async def receive_limited() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > self.max_body:
                    raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, receive_limited, send_wrapper)
        except _BodyTooLarge:
            status_box[0] = 413
            await _send_problem(send, 413, f"request body larger than {self.max_body} bytes")
        finally:
            m.record(m.child("requests", name, str(status_box[0])))
            m.record(m.child("latency", name), time.perf_counter() - t0)


class _BodyTooLarge(Exception):
    pass


async def _send_problem(send: Any, status: int, error: str) -> None:
    body = orjson.dumps({"error": error, "detail": None})
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# ---- the app ----------------------------------------------------------------------------------
def create_app(settings: "Settings | None" = None) -> FastAPI:
    from core.config import load_settings

    settings = settings or load_settings()
    cfg = settings.serving

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        import gc
        import sys

        from serving.metrics import mark_process_dead
        from serving.state import build_state, close_state

        switch = sys.getswitchinterval()
        sys.setswitchinterval(cfg.gil_switch_interval_ms / 1000.0)  # see ServingSettings.gil_switch_interval_ms
        state = None
        try:
            state = await build_state(settings)
            app.state.serving = state
            if cfg.gc_freeze:
                gc.collect()  # before traffic: whatever start-up left as garbage goes now
                gc.freeze()
            yield
        finally:
            if state is not None:
                await close_state(state)
            mark_process_dead()
            sys.setswitchinterval(switch)  # an app run inside another process (tests) leaves it as it was
            if cfg.gc_freeze:
                gc.unfreeze()

    app = FastAPI(title="recsys serving", version="1", lifespan=lifespan,
                  description="Two-stage recommendations with online features, fallbacks, a durable feedback log, "
                              "hot model reload and Prometheus metrics.")

    # ---- errors: clear messages, never a stack trace ----------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return _json({"error": exc.error, "detail": exc.detail}, exc.status, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        return _json({"error": "invalid request: " + _describe(exc.errors()), "detail": _clean(exc.errors())}, 422)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> Response:
        return _json({"error": str(exc.detail), "detail": None}, exc.status_code, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return _json({"error": "internal error (logged on the server)", "detail": None}, 500)

    # ---- auth -------------------------------------------------------------------------------
    def _check_key(request: Request) -> None:
        _check_key_value(request.headers.get(cfg.api_key_header))

    def _check_key_value(given: str | None) -> None:
        expected = cfg.api_key
        if expected is None:
            return
        if given is None:
            raise ApiError(401, f"missing API key: send it in the {cfg.api_key_header} header")
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise ApiError(403, "invalid API key")

    # ``async def`` dependencies: FastAPI runs a plain ``def`` one on the thread pool, one thread
    # hop per request for a dictionary lookup
    async def require_key(request: Request) -> None:
        _check_key(request)

    async def require_key_for_reads(request: Request) -> None:
        if cfg.require_key_for_reads:
            _check_key(request)

    async def require_admin(request: Request) -> None:
        if cfg.api_key is None:
            raise ApiError(403, "admin endpoints are disabled: configure serving.api_key")
        _check_key(request)

    def st(request: Request) -> "ServingState":
        return request.app.state.serving

    def check_id(value: str, what: str) -> str:
        if not value.strip():
            raise ApiError(422, f"{what} must not be empty")
        if len(value) > cfg.max_id_length:
            raise ApiError(422, f"{what} is longer than {cfg.max_id_length} characters")
        return value

    # ---- probes and metrics -----------------------------------------------------------------
    @app.get("/healthz", response_model=Health, tags=["ops"])
    async def healthz() -> Response:
        """Alive (the process answers), and which worker answered: a client that opens fresh
        connections sees every worker that is listening (``ServerProcess`` waits for all of them)."""
        return _json({"status": "ok", "detail": {"worker": os.getpid()}})

    @app.get("/readyz", response_model=Health, responses={503: {"model": Health}}, tags=["ops"])
    async def readyz(request: Request) -> Response:
        """Ready when models, the online feature store and the event log are loaded (503 otherwise)."""
        s = st(request)
        ready = s.is_ready()
        s.metrics.ready.set(1 if ready else 0)
        return _json({"status": "ready" if ready else "not ready", "detail": s.readiness()}, 200 if ready else 503)

    @app.get("/metrics", tags=["ops"])
    async def prometheus_metrics() -> Response:
        """Prometheus exposition (all workers)."""
        from serving.metrics import render

        body, ctype = render()
        return Response(body, media_type=ctype)

    @app.get("/noop", tags=["ops"], include_in_schema=False)
    async def noop() -> Response:
        """The benchmark's ceiling: the same server, no work."""
        return _json({"ok": True})

    # ---- recommendations ----------------------------------------------------------------------
    # The hottest route reads its path and query parameters itself: FastAPI's per-request
    # parameter solving (typing introspection per parameter) cost more event-loop CPU than the
    # rest of the handler. They are still declared for OpenAPI (/docs) and validated with the
    # same bounds and messages.
    rec_query_params = [
        {"name": "user_id", "in": "path", "required": True, "schema": {"type": "string"},
         "description": "External user id; unknown users get popular items (cold start)."},
        {"name": "k", "in": "query", "required": False, "description": f"How many items (1..{cfg.max_k}).",
         "schema": {"type": "integer", "minimum": 1, "maximum": cfg.max_k, "default": cfg.default_k}},
        {"name": "context", "in": "query", "required": False,
         "description": 'Context, e.g. device:web or {"device": "web"}.', "schema": {"type": "string", "maxLength": 512}},
    ]

    async def recommendation_response(state: "ServingState", user_id: str, query: Mapping[str, str],
                                      api_key: str | None) -> bytes:
        """The recommendations route's body (raises :class:`ApiError` for a 4xx): the ONE handler
        behind both the framework's route and the middleware's fast path."""
        from serving.popularity import canonical_context
        from serving.recommend import recommend

        if cfg.require_key_for_reads:
            _check_key_value(api_key)
        user_id = check_id(user_id, "user_id")
        k = parse_k(query.get("k"))
        context = query.get("context")
        if context is not None and len(context) > 512:
            raise query_error("context", "invalid context: longer than 512 characters")
        try:
            ctx = canonical_context(context)
        except ValueError as exc:
            raise query_error("context", f"invalid context: {exc}") from None
        return orjson.dumps(await recommend(state, user_id, k=k, context=ctx))

    @app.get("/v1/recommendations/{user_id}", response_model=Recommendations, responses=ERRORS,
             tags=["recommendations"], openapi_extra={"parameters": rec_query_params})
    async def recommendations(request: Request) -> Response:
        """Top-k items for a user: online features -> two-stage models -> fallbacks (never a 5xx)."""
        body = await recommendation_response(st(request), request.path_params["user_id"], request.query_params,
                                             request.headers.get(cfg.api_key_header))
        return Response(body, media_type="application/json")

    key_header = cfg.api_key_header.lower().encode("latin-1")

    async def recommendations_fast(scope: dict, user_id: str) -> tuple[int, bytes, dict[str, str] | None]:
        """``GET /v1/recommendations/{user_id}`` straight from the ASGI scope (see
        :class:`LimitsAndMetrics`): query and header parsed as Starlette parses them, errors
        rendered as the exception handlers render them."""
        try:
            query = dict(parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True))  # last value wins
            api_key = next((v.decode("latin-1") for k, v in scope["headers"] if k == key_header), None)
            return 200, await recommendation_response(scope["app"].state.serving, user_id, query, api_key), None
        except ApiError as exc:
            return exc.status, orjson.dumps({"error": exc.error, "detail": exc.detail}), exc.headers
        except Exception:  # noqa: BLE001 - as the framework's handler: logged, never a stack trace out
            log.exception("unhandled error on %s", scope.get("path"))
            return 500, orjson.dumps({"error": "internal error (logged on the server)", "detail": None}), None

    def query_error(name: str, message: str) -> ApiError:
        """A 422 shaped like FastAPI's validation errors (``detail`` lists the offending parameter)."""
        return ApiError(422, message, [{"loc": ["query", name], "msg": message, "type": "value_error"}])

    def parse_k(raw: str | None) -> int:
        if raw is None:
            return cfg.default_k
        try:
            k = int(raw)
        except ValueError:
            raise query_error("k", f"invalid request: k must be an integer in 1..{cfg.max_k}, got {raw[:32]!r}") from None
        if not 1 <= k <= cfg.max_k:
            raise query_error("k", f"invalid request: k must be in 1..{cfg.max_k}, got {k}")
        return k

    @app.get("/v1/items/{item_id}/similar", response_model=SimilarItems, responses=ERRORS,
             dependencies=[Depends(require_key_for_reads)], tags=["recommendations"])
    async def similar(request: Request, item_id: str,
                      k: Annotated[int, Query(ge=1, le=cfg.max_k)] = cfg.default_k) -> Response:
        """Items closest to ``item_id`` in the retrieval model's item space (popular items without models)."""
        s = st(request)
        check_id(item_id, "item_id")
        engine = s.models.engine
        if engine is not None and item_id in engine.retrieval.items.index:
            try:
                items, scores = engine.similar(item_id, k=k)
                return _json({"item_id": item_id, "items": _items(items, scores), "model_versions": engine.versions,
                              "fallback_reason": None})
            except Exception as exc:  # noqa: BLE001 - fall back below
                s.note_failure("similar", exc)
                reason = "model_error"
        elif s.known_item(item_id) and s.catalog:
            reason = "model_unavailable" if engine is None else "item_not_in_model"
        else:
            raise ApiError(404, f"unknown item_id {item_id!r}")
        items, scores, _ = s.popularity.top(k, exclude=[item_id])
        s.metrics.fallbacks.labels(reason=reason).inc()
        return _json({"item_id": item_id, "items": _items(items, scores), "model_versions": {}, "fallback_reason": reason})

    # ---- feedback -------------------------------------------------------------------------------
    event_schema = EventIn.model_json_schema()

    @app.post("/v1/events", status_code=202, response_model=EventsAccepted, responses={**ERRORS, 503: {"model": Problem}},
              dependencies=[Depends(require_key)], tags=["feedback"],
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {"anyOf": [
                  event_schema, {"type": "array", "items": event_schema},
                  {"type": "object", "properties": {"events": {"type": "array", "items": event_schema}},
                   "required": ["events"]}]}}}}})
    async def post_events(request: Request, sync_features: bool = Query(
            False, description="Wait until the online features reflect the events (read-your-writes).")) -> Response:
        """Record feedback: 202 only once the events are durably in the event log; the user's online
        features are updated right after (before the 202 with ``sync_features=true``)."""
        from serving.popularity import canonical_context

        s = st(request)
        raw = await request.body()
        if not raw:
            raise ApiError(400, "empty body: send one event object, a list of events, or {\"events\": [...]}")
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, f"malformed JSON: {exc}") from None
        if isinstance(data, dict) and "events" in data and set(data) == {"events"}:
            data = data["events"]
        items_in = data if isinstance(data, list) else [data]
        if not items_in:
            raise ApiError(422, "no events in the request")
        if len(items_in) > cfg.max_batch_events:
            raise ApiError(413, f"{len(items_in)} events in one request; the limit is {cfg.max_batch_events}")
        try:
            events = _EVENTS.validate_python(items_in)
        except ValidationError as exc:
            raise ApiError(422, "invalid event: " + _describe(exc.errors(), prefix="events"), _clean(exc.errors())) from None
        now = datetime.now(timezone.utc)
        records = []
        missing: list[int] = []
        for i, e in enumerate(events):
            if not s.known_item(e.item_id):
                raise ApiError(422, f"events[{i}].item_id: unknown item_id {e.item_id!r} (not in the catalog)")
            try:
                ctx = canonical_context(e.context) if e.context is not None else None
            except ValueError as exc:
                raise ApiError(422, f"events[{i}].context: {exc}") from None
            ts = e.timestamp or now
            ts = ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts.astimezone(timezone.utc)
            rec = {"user_id": e.user_id, "item_id": e.item_id, "event_type": e.event_type, "value": e.value,
                   "timestamp": ts.isoformat(), "context": ctx, "event_id": e.event_id}
            if e.event_id is None:
                missing.append(i)
                rec["_us"] = (ts - _EPOCH) // _MICRO
            if e.request_id:
                rec["request_id"] = e.request_id
            records.append(rec)
        if missing:  # the same deterministic ids batch ingest gives (core.schemas.make_event_ids), no pandas
            from serving.eventlog import event_ids

            sub = [records[i] for i in missing]
            for rec, eid in zip(sub, event_ids([r["user_id"] for r in sub], [r["item_id"] for r in sub],
                                               [r["event_type"] for r in sub], [r.pop("_us") for r in sub])):
                rec["event_id"] = eid
        ids = [r["event_id"] for r in records]
        try:
            await s.log.append("events", records, keys=ids)
        except Exception as exc:  # noqa: BLE001 - not durable: the client must retry
            s.metrics.events.labels(outcome="log_failed").inc(len(records))
            s.note_failure("eventlog", exc)
            raise ApiError(503, "the event log did not acknowledge the events; retry (same event_id is safe)",
                           headers={"Retry-After": "1"}) from None
        s.metrics.events.labels(outcome="accepted").inc(len(records))
        updated = False
        if cfg.update_features_on_event:
            # off the request's critical path: queued records, converted and applied in batches
            updated = await s.features.apply(records, wait=sync_features)
        return _json({"accepted": len(records), "event_ids": ids, "durable": s.log.durable,
                      "features_updated": updated}, 202)

    # ---- admin --------------------------------------------------------------------------------
    @app.post("/admin/reload", dependencies=[Depends(require_admin)], responses=ERRORS, tags=["admin"])
    async def reload(request: Request) -> Response:
        """Reload models by alias now (this worker; the others follow via the reload marker),
        and rebuild the popularity fallback and catalog from the lake."""
        import asyncio

        from serving.popularity import build_popularity
        from serving.state import load_catalog

        s = st(request)
        before = dict(s.models.engine.versions) if s.models.engine else {}
        await asyncio.to_thread(s.models.load)
        s.models.request_reload_all()
        s.popularity = await asyncio.to_thread(build_popularity, settings)
        s.catalog = await asyncio.to_thread(load_catalog, settings)
        after = dict(s.models.engine.versions) if s.models.engine else {}
        return _json({"before": before, "after": after, "status": s.readiness()})

    app.add_middleware(LimitsAndMetrics, max_body=cfg.max_body_bytes,
                       fast_get=("/v1/recommendations/", recommendations_fast))
    return app


def _items(items: list[str], scores: list[float]) -> list[dict[str, Any]]:
    return [{"item_id": i, "score": float(sc), "position": p} for p, (i, sc) in enumerate(zip(items, scores))]


def _clean(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validation errors without echoing the input back (it may be large or sensitive)."""
    return [{"loc": [str(x) for x in e.get("loc", ())], "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errors]


def _describe(errors: list[dict[str, Any]], prefix: str = "") -> str:
    parts = []
    for e in errors[:3]:
        loc = [str(x) for x in e.get("loc", ()) if x not in ("body",)]
        if prefix and loc and loc[0].isdigit():
            loc = [f"{prefix}[{loc[0]}]"] + loc[1:]
        parts.append(f"{'.'.join(loc) or 'request'}: {e.get('msg', '')}")
    more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more
