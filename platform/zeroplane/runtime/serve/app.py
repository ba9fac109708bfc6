"""Ray Serve application: a model version (optionally plus a canary version) behind OpenAI-style HTTP.

Deployed as ``zeroplane.runtime.serve.app:build_app`` (a Serve *application builder*) with a route prefix
``/<model_name>``. This module holds only the deployments and the routes; the pieces live by role in:

* :mod:`.protocol` — application arguments, request bodies, validation messages, the error shape;
* :mod:`.auth` — API keys (bounded-staleness cache of the key store, the bearer check);
* :mod:`.metrics` — the Prometheus series, recorded through one call into both sinks;
* :mod:`.engine` — the generation engines (``serve.engine``);
* :mod:`.text` — token ids to text: eos, stop strings, what is safe to stream;
* :mod:`.canary` — the traffic split;
* :mod:`.server` — one replica's request path (validate, tokenize, generate, answer).

Routes, relative to the prefix:

* ``POST /v1/completions`` — OpenAI-style text completion (see :class:`.protocol.CompletionRequest`).
* ``POST /v1/chat/completions`` — OpenAI-style chat (see :class:`.protocol.ChatCompletionRequest`). The
  messages become one prompt through the tokenizer's ``chat_template`` when the model version has one, else
  through a plain default template (:func:`.protocol.default_chat_prompt`): one ``"<role>: <content>\\n"``
  line per message, then ``"assistant:"``; with the default template generation also stops before a
  ``"\\nuser:"``, ``"\\nsystem:"`` or ``"\\nassistant:"`` line (the model starting the next turn).
* ``stream: true`` on either route: server-sent events in OpenAI's chunk format, ended by ``data: [DONE]``;
  ``stream_options: {"include_usage": true}`` adds a last chunk with ``usage``. A client that disconnects
  stops its generation.
* ``GET /v1/models`` — the model version(s) this application serves.
* ``GET /metrics`` — this replica's counters in Prometheus text format (see :mod:`.metrics`).
* ``GET /healthz`` — liveness, never needs a key.

Canary: with ``canary`` in the arguments the application has two deployments, ``ModelServer`` (the stable
version, the HTTP ingress) and ``ModelServerCanary`` (the canary version, reached through a deployment
handle); see :mod:`.canary` for the split.

Auth: with ``auth`` on (the default) every route but ``/healthz`` needs ``Authorization: Bearer <key>`` for a
non-revoked key of ``<storage_path>/serve/api_keys.json``, checked before the body is read (see :mod:`.auth`).

Errors: every client mistake gets a 4xx with the OpenAI error shape
``{"error": {"message", "type": "invalid_request_error", "param", "code"}}`` whose message names the field and
the limit; 401 bad/missing key, 404 unknown model, 413 oversized body, 400 anything else; 503 when the key
store cannot be read, 504 ``request_timeout`` past ``request_timeout_s``. Any
:class:`zeroplane.errors.ZeroplaneError` raised while handling a request becomes that shape with its
``http_status``.

Health: Serve calls each replica's ``check_health`` (every 10 s by default); it fails while the engine is
wedged or a key store read hangs (:meth:`.server.ModelCore.health`), so Serve replaces the replica.
"""

# No ``from __future__ import annotations`` here: @serve.ingress ships the routes to replicas with
# cloudpickle, which keeps only the globals a function's code uses, so FastAPI could not resolve a
# string annotation such as "Request" there and would treat ``request`` as a query parameter.
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from zeroplane.errors import ZeroplaneError
from zeroplane.names import CANARY_DEPLOYMENT, DEPLOYMENT
from zeroplane.runtime.serve import auth
from zeroplane.runtime.serve.auth import KeyCache as _KeyCache
from zeroplane.runtime.serve.engine import PastDeadline as _PastDeadline
from zeroplane.runtime.serve.protocol import (
    DEFAULT_CHAT_STOPS, DEFAULT_MAX_TOKENS, GREEDY_TEMPERATURE_EPS, KEY_MAX_STALE_S, KEY_READ_TIMEOUT_S,
    KEY_RETRY_S, MAX_BODY_BYTES, MAX_N, MAX_STOP_CHARS, MAX_STOP_STRINGS, REQUEST_TIMEOUT_S, ROUTES, APIError,
    CanaryArgs, ChatCompletionRequest, ChatMessage, CompletionRequest, ServeAppArgs, StreamOptions,
    default_chat_prompt, error_body, parse_args, validation_message,
)
from zeroplane.runtime.serve.server import ModelCore

logger = logging.getLogger("ray.serve")

#: What a handle call to the canary raises when Serve has deleted the canary deployment (a split that ended
#: while this ingress replica still routes) or the canary replica died under the request. A request that
#: Serve queued while the canary's replicas were stopping raises nothing: it waits, which is why a rollout
#: first drains the canary (:func:`zeroplane.releases.drain_step`).
_CANARY_GONE = (DeploymentUnavailableError, RayActorError)

_validation_message = validation_message
_ModelCore = ModelCore

#: What this module exports: the builder and deployments, and the names it held before the split.
__all__ = [
    "build_app", "ModelServer", "ModelServerCanary", "_KeyCache", "_PastDeadline", "_ModelCore",
    "_validation_message", "DEFAULT_CHAT_STOPS", "DEFAULT_MAX_TOKENS", "GREEDY_TEMPERATURE_EPS", "KEY_MAX_STALE_S",
    "KEY_READ_TIMEOUT_S", "KEY_RETRY_S", "MAX_BODY_BYTES", "MAX_N", "MAX_STOP_CHARS", "MAX_STOP_STRINGS",
    "REQUEST_TIMEOUT_S", "APIError", "CanaryArgs", "ChatCompletionRequest", "ChatMessage", "CompletionRequest",
    "ServeAppArgs", "StreamOptions", "default_chat_prompt",
]


def _error_response(exc: ZeroplaneError) -> JSONResponse:
    """``exc`` as an HTTP response: status ``exc.http_status``, body :func:`.protocol.error_body`."""
    return JSONResponse(status_code=exc.http_status, content=error_body(exc), headers=getattr(exc, "headers", None))


_api = FastAPI(
    title="zeroplane model server",
    docs_url=None,  # every route but /healthz needs a key: no unauthenticated schema pages
    redoc_url=None,
    openapi_url=None,
)


# Exception handlers must be registered before the class is decorated with @serve.ingress: the
# decorator pickles a frozen copy of the app at that point.
@_api.exception_handler(ZeroplaneError)
async def _zeroplane_error_handler(request: Request, exc: ZeroplaneError) -> JSONResponse:
    """THE mapping of zeroplane's errors to HTTP: the error shape with the exception's ``http_status``."""
    return _error_response(exc)


@_api.exception_handler(RequestValidationError)
async def _request_validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = validation_message(list(exc.errors()), getattr(exc, "body", None), cap=None)
    return _error_response(APIError(400, message, param=param, code="invalid_request"))


@_api.exception_handler(StarletteHTTPException)
async def _http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}; {ROUTES}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}; {ROUTES}"
    else:
        message = str(exc.detail)
    return _error_response(APIError(exc.status_code, message, headers=getattr(exc, "headers", None)))


@_api.exception_handler(Exception)
async def _server_error_handler(request: Request, exc: Exception) -> JSONResponse:
    # Starlette still re-raises after answering, so the traceback lands in the replica log.
    return _error_response(APIError(500, f"internal error ({type(exc).__name__}); see the replica logs"))


# Module-level helpers used by the routes must be defined before the class: @serve.ingress pickles the
# routes when the class is decorated.
async def _relay(events: Any) -> Any:
    """Pass SSE chunks on to the client; on a disconnect close (or cancel) the source generator."""
    try:
        async for item in events:
            yield item
    finally:
        await _close_events(events)


async def _close_events(events: Any) -> None:
    if hasattr(events, "aclose"):
        await events.aclose()
    elif hasattr(events, "cancel"):
        events.cancel()


async def _event_response(events: Any) -> Any:
    """The HTTP answer of a streamed request: its first item is ``{"status", "error"?}``; a 200 becomes an SSE
    stream of the rest, anything else the JSON error."""
    try:
        first = await events.__anext__()
    except BaseException:
        await _close_events(events)
        raise
    if first["status"] != 200:
        await _close_events(events)
        return JSONResponse(status_code=first["status"], content={"error": first["error"]})
    return StreamingResponse(_relay(events), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _Replica:
    """What both deployments share: the loaded :class:`.server.ModelCore` and Serve's health check."""

    def __init__(self, args: dict, canary: Any = None) -> None:
        self._core = ModelCore.load(args, canary)

    def __del__(self) -> None:
        core = getattr(self, "_core", None)
        if core is not None:
            core._engine.shutdown()

    def check_health(self) -> None:
        """Serve's replica health check: raises (so Serve replaces the replica) while the engine is wedged or
        a key store read hangs."""
        reason = self._core.health()
        if reason is not None:
            raise RuntimeError(f"unhealthy: {reason}")

    async def handle_api(self, kind: str, body: Any) -> tuple:
        """See :meth:`.server.ModelCore.handle_api` (the ingress of a traffic split calls it)."""
        return await self._core.handle_api(kind, body)

    async def stream_api(self, kind: str, body: Any) -> Any:
        """See :meth:`.server.ModelCore.stream_api`."""
        async for item in self._core.stream_api(kind, body):
            yield item


@serve.deployment(name=DEPLOYMENT)
@serve.ingress(_api)
class ModelServer(_Replica):
    """The HTTP ingress of an application: the replica plus the OpenAI-style routes."""

    @_api.get("/healthz")
    async def healthz(self) -> dict:
        """Liveness; no key needed. Returns ``{"status": "ok", "model": "<name>:<version>"}``."""
        return {"status": "ok", "model": self._core._served_id}

    @_api.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        """OpenAI-style model list: this version, plus the canary version and both weights in a split."""
        await auth.authorize(self._core._keys, request.headers)
        return {"object": "list", "data": self.models_api()}

    def models_api(self) -> list:
        """The ``data`` entries of ``/v1/models`` for this application (also asked by the ``/v1`` gateway)."""
        core = self._core
        entry = {
            "id": core._served_id,
            "object": "model",
            "created": core._created,
            "owned_by": "zeroplane",
            "root": core._name,
            "version": core._args.version,
            "context_length": core._context,
            "max_tokens_cap": core._args.max_tokens_cap,
        }
        data = [entry]
        if core._split is not None:
            entry["weight_percent"] = 100.0 - core._split.weight_percent
            data.append({**entry, "id": core._split.canary_id, "version": core._args.canary.version,
                         "weight_percent": core._split.weight_percent})
        return data

    @_api.get("/metrics")
    async def metrics(self, request: Request) -> PlainTextResponse:
        """This replica's request metrics in Prometheus text format (see :mod:`.metrics`)."""
        await auth.authorize(self._core._keys, request.headers)
        return PlainTextResponse(self._core._metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @_api.post("/v1/completions")
    async def completions(self, request: Request):
        """OpenAI-style text completion; see :class:`.protocol.CompletionRequest` for the body."""
        return await self._dispatch("completions", request)

    @_api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        """OpenAI-style chat completion; see :class:`.protocol.ChatCompletionRequest` for the body."""
        return await self._dispatch("chat", request)

    async def _dispatch(self, kind: str, request: Request):
        core = self._core
        started = time.monotonic()
        try:
            await auth.authorize(core._keys, request.headers)
            body = await core._read_json(request)
        except ZeroplaneError as e:
            core._observe(kind, e.http_status, started)
            raise
        target = self._target(body, request.headers.get("x-request-id"))
        streaming = isinstance(body, dict) and body.get("stream") is True
        if not streaming:
            if target is None:
                return await core.answer(kind, body, started)
            try:
                status, payload = await target.handle_api.remote(kind, body)
            except _CANARY_GONE as e:
                self._canary_gone(body, e)
                return await core.answer(kind, body, started)
            return JSONResponse(status_code=status, content=payload)
        if target is None:
            return await _event_response(core.stream(kind, body, started))
        try:
            return await _event_response(target.options(stream=True).stream_api.remote(kind, body))
        except _CANARY_GONE as e:
            self._canary_gone(body, e)
            return await _event_response(core.stream(kind, body, started))

    def _canary_gone(self, body: Any, error: BaseException) -> None:
        """A request drawn for the canary could not reach it (``error`` is one of ``_CANARY_GONE``: the split
        ended and Serve deleted the canary deployment, or the canary replica died): the stable version answers
        it instead, unless the request named the canary version itself, which gets a 503 to retry."""
        split = self._core._split
        model = body.get("model") if isinstance(body, dict) else None
        if model == split.canary_id:
            raise APIError(503, f"model {model}: that version is not available on this endpoint right now; retry, "
                                f"or name {split.stable_id}", param="model", code="model_unavailable") from error
        logger.warning("canary %s unavailable (%s); answering with %s", split.canary_id, type(error).__name__,
                       split.stable_id)


    def _target(self, body: Any, request_id: Any) -> Any:
        """None to answer here, or the canary's handle (see :mod:`.canary`)."""
        core = self._core
        if core._split is None:
            return None
        model = body.get("model") if isinstance(body, dict) else None
        return core._canary if core._split.to_canary(model, request_id) else None

    async def gateway_api(self, kind: str, body: Any, request_id: Any) -> tuple:
        """A non-streaming request forwarded by the ``/v1`` gateway (already authorized): routed through this
        application's split like one sent to its own prefix. Returns ``(HTTP status, JSON body)``."""
        target = self._target(body, request_id)
        if target is not None:
            try:
                return await target.handle_api.remote(kind, body)
            except _CANARY_GONE as e:
                try:
                    self._canary_gone(body, e)
                except APIError as refused:
                    return refused.http_status, error_body(refused)
        return await self._core.handle_api(kind, body)

    async def gateway_stream(self, kind: str, body: Any, request_id: Any) -> Any:
        """Streaming twin of :meth:`gateway_api`: ``{"status", "error"?}`` then SSE chunks."""
        target = self._target(body, request_id)
        first = None
        if target is not None:
            events: Any = target.options(stream=True).stream_api.remote(kind, body)
            try:
                first = await events.__anext__()
            except _CANARY_GONE as e:
                await _close_events(events)
                try:
                    self._canary_gone(body, e)
                except APIError as refused:
                    yield {"status": refused.http_status, "error": error_body(refused)["error"]}
                    return
            except BaseException:
                await _close_events(events)
                raise
        if first is None:
            events = self._core.stream_api(kind, body)
        try:
            if first is not None:
                yield first
            async for item in events:
                yield item
        finally:
            await _close_events(events)


@serve.deployment(name=CANARY_DEPLOYMENT)
class ModelServerCanary(_Replica):
    """The canary version of a traffic split (no HTTP routes: the ingress forwards through a handle)."""


def build_app(args: dict) -> serve.Application:
    """Serve application builder for one model version (``zeroplane.runtime.serve.app:build_app``).

    Args:
        args: JSON values, validated by :class:`.protocol.ServeAppArgs`:
            ``model_name`` (str), ``version`` (str, e.g. ``"v1"``), ``model_uri`` (local folder or
            ``s3://`` URI of a Hugging Face model folder), ``storage_path`` (storage root with
            ``serve/api_keys.json``; required when ``auth``), ``auth`` (bool, default true),
            ``max_tokens_cap`` (int, default 256), ``max_batch_size`` (int, default 8),
            ``batch_wait_timeout_s`` (float seconds, default 0.01), ``engine`` (``"continuous"``, the
            default, or ``"generate"``; see :mod:`.engine`), ``key_cache_ttl_s`` (float
            seconds, default 5), ``key_max_stale_s`` (float seconds, default 60), ``request_timeout_s``
            (float seconds, default 300), ``canary`` (optional ``{"version", "model_uri", "weight_percent"}``).

    Returns:
        The bound ``ModelServer`` deployment (the HTTP ingress), to be run with
        ``route_prefix="/<model_name>"``; with ``canary`` it holds a handle to a second deployment,
        ``ModelServerCanary``, serving the canary version with the same options.
        ``max_ongoing_requests`` defaults to ``max(16, 2 * max_batch_size)`` per replica so a full
        batch can form; a Serve config that sets it wins.

    Raises:
        ValueError: a missing, misspelled or out-of-range argument (the message names it).
    """
    cfg = parse_args(args)
    ongoing = max(16, 2 * cfg.max_batch_size)
    canary = None
    if cfg.canary is not None:
        canary_args = cfg.model_copy(update={
            "version": cfg.canary.version, "model_uri": cfg.canary.model_uri, "canary": None,
        }).model_dump()
        canary = ModelServerCanary.options(max_ongoing_requests=ongoing).bind(canary_args)
    return ModelServer.options(max_ongoing_requests=ongoing).bind(cfg.model_dump(), canary)
