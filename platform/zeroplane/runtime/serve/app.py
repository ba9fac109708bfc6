"""Ray Serve application: a model version (optionally plus a canary version) behind OpenAI-style HTTP.

Deployed as ``zeroplane.runtime.serve.app:build_app`` (a Serve *application builder*) with a route
prefix ``/<model_name>``. Routes, relative to that prefix:

* ``POST /v1/completions`` — OpenAI-style text completion (see :class:`CompletionRequest`).
* ``POST /v1/chat/completions`` — OpenAI-style chat (see :class:`ChatCompletionRequest`). The messages
  become one prompt through the tokenizer's ``chat_template`` when the model version has one, else
  through a plain default template (:func:`default_chat_prompt`): one ``"<role>: <content>\\n"`` line
  per message, then ``"assistant:"``; with the default template generation also stops before a
  ``"\\nuser:"``, ``"\\nsystem:"`` or ``"\\nassistant:"`` line (the model starting the next turn).
* ``stream: true`` on either route: server-sent events in OpenAI's chunk format, ended by
  ``data: [DONE]``; ``stream_options: {"include_usage": true}`` adds a last chunk with ``usage``.
  Streams are generated token by token outside the batcher; a client that disconnects stops its
  generation after at most one more token.
* ``GET /v1/models`` — the model version(s) this application serves.
* ``GET /metrics`` — this replica's counters in Prometheus text format (see :class:`_Metrics`); the same
  series go to Ray's metrics export (``ray_``-prefixed) through :mod:`ray.serve.metrics`.
* ``GET /healthz`` — liveness, never needs a key.

Canary: with ``canary`` in the arguments the application has two deployments, ``ModelServer`` (the
stable version, the HTTP ingress) and ``ModelServerCanary`` (the canary version, reached through a
deployment handle). The ingress sends ``canary.weight_percent`` % of requests to the canary: chosen
from a hash of the ``X-Request-Id`` header when the request has one (so a retried request lands on the
same version), else at random. A request whose ``model`` names a version (``<name>:v2``) goes to it.

Auth: with ``auth`` on (the default) every route but ``/healthz`` needs ``Authorization: Bearer <key>``
for a non-revoked key of ``<storage_path>/serve/api_keys.json`` (see :mod:`zeroplane.serve_keys`). The
key is checked before the body is read or any model work is done. Each replica caches the key file and
re-reads it at most every ``key_cache_ttl_s`` (5 s), so a new or revoked key takes effect within that. A
request waits at most ``KEY_READ_TIMEOUT_S`` (5 s) for a read; while the file cannot be read the cached keys
are trusted for at most ``key_max_stale_s`` (``KEY_MAX_STALE_S``, 60 s), then every keyed route answers 503
``key_store_unavailable`` until the file can be read again (see :class:`_KeyCache`).

Errors: every client mistake gets a 4xx with the OpenAI error shape
``{"error": {"message", "type": "invalid_request_error", "param", "code"}}`` whose message names the
field and the limit; 401 bad/missing key, 404 unknown model, 413 oversized body (counted while it is read,
so a chunked body is cut off at ``MAX_BODY_BYTES``), 400 anything else. Server side: 503 when the key store
cannot be read (above), 504 ``request_timeout`` when a request runs past ``request_timeout_s``.
One exception handler makes that answer: any :class:`zeroplane.errors.ZeroplaneError` raised while
handling a request (a request mistake is an :class:`APIError`, one of them) becomes the error shape with
the exception's ``http_status`` (``type`` ``server_error`` for a 5xx).

Generation (per replica): non-streaming requests are queued through ``@serve.batch``. Greedy requests
(``temperature == 0``) in a batch are left-padded into one ``generate`` call (grouped so that every row
fits the context window), run to the longest ``max_tokens`` of the group and cut per request. Sampled
requests run one by one with their own seed (random when not given; choice ``i`` of ``n`` uses
``seed + i``) so that a seeded request gives the same text whatever else is in the batch. All model work
runs in worker threads under one lock, so the replica's event loop keeps answering ``/healthz``
meanwhile; the tokenizer is only used on the event loop thread (Hugging Face fast tokenizers are not
safe under concurrent use). Each request has ``request_timeout_s`` (``REQUEST_TIMEOUT_S``, 300 s) from its
arrival: past that its generation stops (a job not started is dropped, a running row stops after the token
in flight) and it is answered 504; a stream, whose 200 is already sent, ends with an error event
``data: {"error": {...}}`` and no ``[DONE]``.

Deployment options (``num_replicas``/``autoscaling_config``, ``ray_actor_options``) come from the Serve
config; the code only names the deployments and raises ``max_ongoing_requests`` so that a replica can
hold a full batch.
"""

# No ``from __future__ import annotations`` here: @serve.ingress ships the routes to replicas with
# cloudpickle, which keeps only the globals a function's code uses, so FastAPI could not resolve a
# string annotation such as "Request" there and would treat ``request`` as a query parameter.
import asyncio
import hashlib
import json
import logging
import os
import random
import secrets
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Literal, Optional, Union

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from zeroplane import serve_keys
from zeroplane.errors import ZeroplaneError, first_line
from zeroplane.layout import KEYS_FILE
from zeroplane import names
from zeroplane.names import CANARY_DEPLOYMENT, DEPLOYMENT
from zeroplane.spec.model import ServeSpec
from zeroplane.storage import Storage

logger = logging.getLogger("ray.serve")

#: Largest accepted request body, in bytes (413 above it).
MAX_BODY_BYTES = 1 << 20
#: ``max_tokens`` when a request gives none (lowered to ``max_tokens_cap`` when that is smaller).
DEFAULT_MAX_TOKENS = 16
#: Temperatures below this are treated as 0 (greedy): dividing logits by a tinier number overflows.
GREEDY_TEMPERATURE_EPS = 1e-5
#: At most this many stop strings per request.
MAX_STOP_STRINGS = 4
#: Longest stop string, in characters (400 above it). Every streamed token searches the text for each stop
#: string and checks which of its prefixes the text ends with (work growing with the square of its length),
#: so an unbounded stop string would let one request buy a lot of replica CPU.
MAX_STOP_CHARS = 256
#: Default ``key_max_stale_s``: seconds a replica keeps trusting its cached API keys while the key store
#: cannot be read. A cache kept forever would let a revoked key work for the whole of a storage outage; past
#: this bound the replica answers 503 instead.
KEY_MAX_STALE_S = 60.0
#: Most seconds a request waits for a key store read (a hanging read must not hold every request).
KEY_READ_TIMEOUT_S = 5.0
#: Seconds after a failed key store read before the next attempt (an outage is not hammered per request).
KEY_RETRY_S = 1.0
#: Default ``request_timeout_s``: seconds from a request's arrival after which its generation is stopped
#: and it is answered 504 (a stream ends with an error event). Without a bound one long request, or a
#: queue behind it, holds the replica's model and the client's connection indefinitely.
REQUEST_TIMEOUT_S = 300.0
#: Most choices (``n``) one non-streaming request may ask for.
MAX_N = 4
#: Stop strings added with the default chat template: the model starting the next turn.
DEFAULT_CHAT_STOPS = ("\nuser:", "\nsystem:", "\nassistant:")
_MAX_SEED = 2**63 - 1


# --------------------------------------------------------------------------------------------------
# Application arguments
# --------------------------------------------------------------------------------------------------


class CanaryArgs(BaseModel):
    """The canary version of a traffic split (``canary`` of :class:`ServeAppArgs`)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    version: str = Field(min_length=1, description="Canary model version, e.g. 'v2'.")
    model_uri: str = Field(min_length=1, description="Local folder or s3:// URI of the canary's model folder.")
    weight_percent: float = Field(
        gt=0, lt=100, description="Percent of requests (not pinned to a version) sent to the canary; 0 < w < 100."
    )


def _serve_spec_field(name: str, description: str) -> Any:
    """The field ``name`` of :class:`zeroplane.spec.model.ServeSpec` (its default and bounds, defined
    there once) with this model's ``description``."""
    import copy

    field = copy.copy(ServeSpec.model_fields[name])
    field.description = description
    return field


#: The serving defaults (``ServeSpec``'s): the ``@serve.batch`` settings a replica starts from.
_SERVE_DEFAULTS = ServeSpec()


class ServeAppArgs(BaseModel):
    """Arguments of :func:`build_app` (the ``args`` of the Serve config's application entry).

    Unknown keys are rejected so that a misspelled option fails the deploy instead of being ignored.
    ``auth``, ``max_tokens_cap``, ``max_batch_size`` and ``batch_wait_timeout_s`` take their defaults and
    bounds from :class:`zeroplane.spec.model.ServeSpec` (the job spec's ``serve`` section).
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_name: str = Field(min_length=1, description="Model name; also the route prefix '/<model_name>'.")
    version: str = Field(min_length=1, description="Model version served, e.g. 'v1'.")
    model_uri: str = Field(
        min_length=1,
        description="Local folder or s3:// URI of a Hugging Face model folder (config, weights, tokenizer).",
    )
    storage_path: Optional[str] = Field(
        None, description=f"Storage root holding {KEYS_FILE}; required when auth is on."
    )
    auth: bool = _serve_spec_field(
        "auth", "Require 'Authorization: Bearer <key>' on every route but /healthz."
    )
    max_tokens_cap: int = _serve_spec_field(
        "max_tokens_cap", "Largest max_tokens a request may ask for (new tokens)."
    )
    max_batch_size: int = _serve_spec_field("max_batch_size", "Most requests generated together by one replica.")
    batch_wait_timeout_s: float = _serve_spec_field(
        "batch_wait_timeout_s", "Seconds a replica waits to fill a batch before generating."
    )
    key_cache_ttl_s: float = Field(
        5.0, ge=0, description="Seconds a replica keeps the API key file before re-reading it."
    )
    key_max_stale_s: float = Field(
        KEY_MAX_STALE_S, gt=0, allow_inf_nan=False,
        description="Seconds a replica keeps trusting its cached API keys while the key file cannot be read; "
                    "then it answers 503.",
    )
    request_timeout_s: float = Field(
        REQUEST_TIMEOUT_S, gt=0, allow_inf_nan=False,
        description="Seconds from a request's arrival after which its generation stops and it gets a 504.",
    )
    canary: Optional[CanaryArgs] = Field(
        None, description="A second version taking weight_percent % of the traffic (deployment ModelServerCanary)."
    )

    @model_validator(mode="after")
    def _storage_needed_for_auth(self) -> "ServeAppArgs":
        if self.canary is not None and self.canary.version == self.version:
            raise ValueError(
                f"canary.version {self.canary.version!r} equals version; a canary must be another version"
            )
        if self.auth and not self.storage_path:
            raise ValueError(
                f"storage_path is required when auth is true (API keys live in <storage_path>/{KEYS_FILE}); "
                "pass storage_path or set auth: false"
            )
        return self


def _parse_args(args: Any) -> ServeAppArgs:
    if isinstance(args, ServeAppArgs):
        return args
    if not isinstance(args, dict):
        raise ValueError(f"build_app args must be a dict, got {type(args).__name__}")
    try:
        return ServeAppArgs.model_validate(args)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'args'}: {err['msg']}" for err in e.errors()
        )
        raise ValueError(f"invalid zeroplane serve app args: {problems}") from None


# --------------------------------------------------------------------------------------------------
# Request schema and errors
# --------------------------------------------------------------------------------------------------


#: One stop string: 1..MAX_STOP_CHARS characters.
_StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]


class _SamplingRequest(BaseModel):
    """The fields completions and chat completions share (see :class:`CompletionRequest`)."""

    model_config = ConfigDict(extra="forbid", strict=True, protected_namespaces=())

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    seed: Optional[int] = Field(None, ge=0, le=_MAX_SEED)
    stop: Optional[Union[_StopString, Annotated[list[_StopString], Field(max_length=MAX_STOP_STRINGS)]]] = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: Optional["StreamOptions"] = None
    user: Optional[str] = None


class CompletionRequest(_SamplingRequest):
    """Body of ``POST /v1/completions`` (a subset of OpenAI's, strictly typed, unknown fields rejected).

    Attributes:
        model: optional; ``<model_name>`` or ``<model_name>:<version>`` of a served version (else 404).
        prompt: a non-empty string, or a list with exactly one string.
        max_tokens: number of NEW tokens to generate per choice, 1..``max_tokens_cap``; default 16.
        temperature: 0..2; 0 is greedy decoding; default 1.0.
        top_p: nucleus sampling mass, 0 < top_p <= 1; default 1.0.
        seed: 0..2**63-1; makes sampling reproducible on a given replica/model.
        stop: a string or up to 4 strings, each 1..256 characters (``MAX_STOP_CHARS``); the text is cut
            before the first one found.
        n: choices to generate, 1..4 (1 when streaming); default 1.
        stream: server-sent events instead of one JSON answer; default false.
        stream_options: ``{"include_usage": bool}`` (streaming only).
        echo: must be false. user: accepted and ignored.
    """

    prompt: Union[str, list[str]]
    echo: bool = False


class StreamOptions(BaseModel):
    """``stream_options`` of a streaming request."""

    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class ChatMessage(BaseModel):
    """One chat message: ``role`` (system, user or assistant) and its text ``content``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str
    name: Optional[str] = None


class ChatCompletionRequest(_SamplingRequest):
    """Body of ``POST /v1/chat/completions``; fields as :class:`CompletionRequest` except:

    Attributes:
        messages: 1 or more :class:`ChatMessage`; rendered into one prompt (see the module docstring).
        max_completion_tokens: OpenAI's newer name for ``max_tokens`` (give at most one of the two).
    """

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)


_SamplingRequest.model_rebuild()
CompletionRequest.model_rebuild()
ChatCompletionRequest.model_rebuild()

_ROUTES = (
    "routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /metrics, GET /healthz"
)


def _field_hints(cap: Optional[int]) -> dict[str, str]:
    tokens = f"an integer from 1 to {cap} (max_tokens_cap of this deployment)" if cap else "an integer of at least 1"
    return {
        "model": "a string naming the served model",
        "prompt": "a non-empty string, or a list holding exactly one string",
        "messages": "a non-empty list of {'role': 'system'|'user'|'assistant', 'content': string}",
        "max_tokens": tokens,
        "max_completion_tokens": tokens,
        "temperature": "a number from 0 to 2 (0 = greedy)",
        "top_p": "a number greater than 0 and at most 1",
        "seed": f"an integer from 0 to {_MAX_SEED}",
        "stop": f"a non-empty string or a list of at most {MAX_STOP_STRINGS} non-empty strings, "
                f"each at most {MAX_STOP_CHARS} characters",
        "n": f"an integer from 1 to {MAX_N} (1 when stream is true)",
        "stream": "true or false",
        "stream_options": "an object {'include_usage': true|false}, only with stream: true",
        "echo": "false (echo is not supported)",
        "user": "a string",
    }


class APIError(ZeroplaneError):
    """A request failure answered with the OpenAI error JSON: a :class:`ZeroplaneError` whose
    ``http_status`` is the one given.

    Args:
        status: HTTP status code (4xx for client mistakes); becomes ``http_status``.
        message: one line naming the field and the limit or the fix.
        param: the offending request field, if any.
        code: a short machine-readable code, e.g. ``"invalid_api_key"``.
        type_: OpenAI error type; default ``"invalid_request_error"`` below 500, else ``"server_error"``.
        headers: extra response headers (e.g. ``WWW-Authenticate``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: Optional[str] = None,
        code: Optional[str] = None,
        type_: Optional[str] = None,
        headers: Optional[dict[str, str]] = None,
    ) -> None:
        super().__init__(message)
        self.http_status = status
        self.param = param
        self.code = code
        self.type = type_
        self.headers = headers


def _error_body(exc: ZeroplaneError) -> dict:
    """The OpenAI error shape of ``exc``: ``{"error": {"message", "type", "param", "code"}}``."""
    status = exc.http_status
    kind = getattr(exc, "type", None) or ("invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": exc.message, "type": kind, "param": getattr(exc, "param", None),
                      "code": getattr(exc, "code", None)}}


def _error_response(exc: ZeroplaneError) -> JSONResponse:
    """``exc`` as an HTTP response: status ``exc.http_status``, body :func:`_error_body`."""
    return JSONResponse(status_code=exc.http_status, content=_error_body(exc), headers=getattr(exc, "headers", None))


def _body_too_large(size: str) -> APIError:
    """The 413 for a request body of ``size`` bytes (``"2000000"``, ``"over 1048576"``)."""
    return APIError(413, f"request body is {size} bytes; the limit is {MAX_BODY_BYTES} bytes")


def _request_timeout(limit_s: float) -> APIError:
    """The 504 for a request that ran past ``request_timeout_s`` (``limit_s`` seconds)."""
    return APIError(
        504, f"the request was stopped after this deployment's limit of {limit_s:g} s (request_timeout_s); "
             "ask for fewer tokens or retry later", code="request_timeout",
    )


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _validation_message(
    errors: list[dict], body: Any, cap: Optional[int], fields: Optional[list[str]] = None
) -> tuple[str, Optional[str]]:
    """One line for the first pydantic error: ``(message, offending field)``.

    Args:
        errors: pydantic's ``errors()``; only the first is reported.
        body: the decoded request body (for the offending value).
        cap: the deployment's ``max_tokens_cap`` (named in the hint), or None.
        fields: the request schema's field names (listed for an unknown field); default all known.
    """
    hints = _field_hints(cap)
    err = errors[0]
    loc = err.get("loc") or ()
    # RequestValidationError locations start with "body"/"query"/…; model_validate ones do not.
    if loc and loc[0] in ("body", "query", "path", "header"):
        loc = loc[1:]
    field = str(loc[0]) if loc else None
    kind = err.get("type", "")
    if kind == "json_invalid":
        return f"request body is not valid JSON: {err.get('msg')}", None
    if field is None:
        return f"request body must be a JSON object: {err.get('msg')}", None
    if kind == "missing":
        return f"'{field}' is required: {hints.get(field, 'a value')}", field
    if kind == "extra_forbidden":
        where = ".".join(str(x) for x in loc)
        if len(loc) > 1:
            return f"unknown field '{where}'; a message has 'role', 'content' and optionally 'name'", field
        return f"unknown field '{field}'; supported fields: {', '.join(fields or hints)}", field
    value = body.get(field) if isinstance(body, dict) else err.get("input")
    hint = hints.get(field)
    if hint:
        return f"'{field}' must be {hint}; got {_short(value)}", field
    return f"'{field}': {err.get('msg')}; got {_short(value)}", field


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
    message, param = _validation_message(list(exc.errors()), getattr(exc, "body", None), cap=None)
    return _error_response(APIError(400, message, param=param, code="invalid_request"))


@_api.exception_handler(StarletteHTTPException)
async def _http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    routes = _ROUTES
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}; {routes}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}; {routes}"
    else:
        message = str(exc.detail)
    return _error_response(APIError(exc.status_code, message, headers=getattr(exc, "headers", None)))


@_api.exception_handler(Exception)
async def _server_error_handler(request: Request, exc: Exception) -> JSONResponse:
    # Starlette still re-raises after answering, so the traceback lands in the replica log.
    return _error_response(APIError(500, f"internal error ({type(exc).__name__}); see the replica logs"))


# --------------------------------------------------------------------------------------------------
# Generation work items
# --------------------------------------------------------------------------------------------------


@dataclass
class _Job:
    """One request's generation work: prompt token ids (1-D), NEW tokens wanted, sampling settings, and the
    ``time.monotonic()`` deadline after which its generation stops (``request_timeout_s``)."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: Optional[int]
    deadline: float

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.deadline


class _PastDeadline:
    """A ``generate`` stopping criterion: row ``i`` is done once ``time.monotonic()`` reaches ``deadlines[i]``
    (so a timed-out request stops using the model after the token in flight)."""

    def __init__(self, deadlines: list[float]) -> None:
        self._deadlines = torch.tensor(deadlines, dtype=torch.float64)

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return (self._deadlines <= time.monotonic()).to(input_ids.device)


def _context_length(config: Any) -> Optional[int]:
    for attr in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass
class _Prepared:
    """A validated request, ready to generate: route kind, prompt ids and per-choice settings."""

    kind: str  # "completions" or "chat"
    prompt_ids: list[int]
    max_tokens: int
    stops: list[str]
    temperature: float
    top_p: float
    seed: Optional[int]
    n: int
    stream: bool
    include_usage: bool
    deadline: float  # time.monotonic() when the request runs out of request_timeout_s

    def job(self, choice: int) -> _Job:
        seed = None if self.seed is None else (self.seed + choice) % (_MAX_SEED + 1)
        return _Job(self.prompt_ids, self.max_tokens, self.temperature, self.top_p, seed, self.deadline)


def default_chat_prompt(messages: list[dict]) -> str:
    """The default chat template: ``"<role>: <content>\\n"`` per message, then ``"assistant:"``.

    Used when the model version's tokenizer has no ``chat_template``.

    Args:
        messages: ``[{"role": ..., "content": ...}, ...]``.

    Returns:
        The prompt text, e.g. ``"system: be brief\\nuser: hi\\nassistant:"``.
    """
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def _stop_holdback(text: str, stops: list[str]) -> int:
    """Characters at the end of ``text`` that could be the start of a stop string (held back when streaming)."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return hold


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class _Metrics:
    """Per-replica request metrics, tagged ``model`` and ``version`` (and ``route``/``status``).

    Each series is recorded twice: in :mod:`ray.serve.metrics` (exported by Ray's metrics agent on each
    node's metrics export port with the ``ray_`` prefix and Serve's deployment/replica/application tags)
    and in a private ``prometheus_client`` registry that ``GET /metrics`` renders (this replica only).

    Series (``zeroplane_`` prefix): ``requests_total{route,status}``, ``request_errors_total{route,status}``
    (status >= 400), ``request_latency_seconds{route}`` (histogram, request arrival to last byte
    generated), ``generated_tokens_total`` and ``generation_seconds_total`` (generated tokens/s of a version
    is ``rate(generated_tokens_total) / rate(generation_seconds_total)`` — or per replica
    ``generated_tokens_total / generation_seconds_total``).
    """

    BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

    def __init__(self, model: str, version: str) -> None:
        import prometheus_client as prom
        from ray.serve import metrics as serve_metrics

        self._tags = {"model": model, "version": version}
        base = ("model", "version")
        self.registry = prom.CollectorRegistry()
        self._prom = {
            "requests": prom.Counter("zeroplane_requests", "Requests answered.", base + ("route", "status"),
                                     registry=self.registry),
            "errors": prom.Counter("zeroplane_request_errors", "Requests answered with status >= 400.",
                                   base + ("route", "status"), registry=self.registry),
            "latency": prom.Histogram("zeroplane_request_latency_seconds", "Request latency in seconds.",
                                      base + ("route",), buckets=self.BUCKETS_S, registry=self.registry),
            "tokens": prom.Counter("zeroplane_generated_tokens", "Tokens generated.", base, registry=self.registry),
            "gen_s": prom.Counter("zeroplane_generation_seconds", "Seconds spent in requests that generated tokens.",
                                  base, registry=self.registry),
        }
        self._ray = {
            "requests": serve_metrics.Counter(names.METRIC_REQUESTS, description="Requests answered.",
                                              tag_keys=base + ("route", "status")),
            "errors": serve_metrics.Counter(names.METRIC_ERRORS,
                                            description="Requests answered with status >= 400.",
                                            tag_keys=base + ("route", "status")),
            "latency": serve_metrics.Histogram("zeroplane_request_latency_seconds",
                                               description="Request latency in seconds.",
                                               boundaries=list(self.BUCKETS_S), tag_keys=base + ("route",)),
            "tokens": serve_metrics.Counter("zeroplane_generated_tokens_total", description="Tokens generated.",
                                            tag_keys=base),
            "gen_s": serve_metrics.Counter("zeroplane_generation_seconds_total",
                                           description="Seconds spent in requests that generated tokens.",
                                           tag_keys=base),
        }

    def observe(self, route: str, status: int, latency_s: float, tokens: int = 0) -> None:
        """Record one answered request (``latency_s`` seconds, ``tokens`` generated over all choices)."""
        rs = {**self._tags, "route": route, "status": str(status)}
        try:
            self._prom["requests"].labels(**rs).inc()
            self._ray["requests"].inc(1, tags=rs)
            if status >= 400:
                self._prom["errors"].labels(**rs).inc()
                self._ray["errors"].inc(1, tags=rs)
            self._prom["latency"].labels(**self._tags, route=route).observe(latency_s)
            self._ray["latency"].observe(latency_s, tags={**self._tags, "route": route})
            if tokens:
                self._prom["tokens"].labels(**self._tags).inc(tokens)
                self._ray["tokens"].inc(tokens, tags=dict(self._tags))
                self._prom["gen_s"].labels(**self._tags).inc(latency_s)
                self._ray["gen_s"].inc(latency_s, tags=dict(self._tags))
        except Exception as e:  # noqa: BLE001 - metrics must never fail a request
            logger.warning("recording metrics failed: %s", e)

    def render(self) -> bytes:
        """This replica's series in Prometheus text format."""
        import prometheus_client as prom

        return prom.generate_latest(self.registry)


# Module-level helpers used by the routes must be defined before the class: @serve.ingress pickles the
# routes when the class is decorated.
async def _relay(events: Any) -> AsyncIterator[str]:
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


class _StreamState:
    """Decoding state of one streamed choice (KV cache, next input, token count, finish reason)."""

    def __init__(self, prompt_ids: list[int], seed: Optional[int]) -> None:
        self.past: Any = None
        self.next_input = torch.tensor([prompt_ids], dtype=torch.long)
        self.generator = torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(63))
        self.n_tokens = 0
        self.finish = "length"


class _KeyCache:
    """A replica's copy of the API key records of a storage root (``<root>/serve/api_keys.json``).

    The records are re-read at most every ``ttl_s`` seconds, so a new or revoked key takes effect within
    that. One read runs at a time, in a worker thread; requests arriving meanwhile wait for that same read,
    each for at most ``read_timeout_s``. When a read fails or does not answer in time, the cached records
    are still used while they are younger than ``max_stale_s`` (a storage hiccup costs nothing); past
    that, or with nothing cached, :meth:`records` raises a 503 — a revoked key must not keep working
    through a long outage. After a failure the next read starts no sooner than ``KEY_RETRY_S`` (1 s) later.

    Args:
        storage: the storage root holding the key file.
        ttl_s: seconds between re-reads (``key_cache_ttl_s``, default 5).
        max_stale_s: seconds the cached records are trusted while the store cannot be read
            (``key_max_stale_s``, default ``KEY_MAX_STALE_S`` = 60).
        read_timeout_s: most seconds a request waits for a read; default ``KEY_READ_TIMEOUT_S`` (5).
    """

    def __init__(self, storage: Storage, ttl_s: float, max_stale_s: float,
                 read_timeout_s: float = KEY_READ_TIMEOUT_S) -> None:
        self._storage = storage
        self._ttl_s = ttl_s
        self._max_stale_s = max_stale_s
        self._read_timeout_s = read_timeout_s
        self._records: list[dict] = []
        self._loaded_at = float("-inf")  # time.monotonic() of the last successful read
        self._retry_at = float("-inf")  # no read starts before this (after a failure)
        self._read: Optional[asyncio.Future] = None  # the read in flight, shared by the requests waiting

    async def records(self) -> list[dict]:
        """The key records to check a bearer key against (re-read first when due; see the class).

        Raises:
            APIError: 503 ``key_store_unavailable`` — the store cannot be read and the cached records are
                older than ``max_stale_s`` (or none were ever read).
        """
        now = time.monotonic()
        if now >= self._retry_at and now - self._loaded_at >= min(self._ttl_s, self._max_stale_s):
            if self._read is None or self._read.done():
                self._read = asyncio.ensure_future(self._load())
            try:  # shield: a waiter giving up (or going away) must not cancel the shared read
                await asyncio.wait_for(asyncio.shield(self._read), self._read_timeout_s)
            except asyncio.TimeoutError:
                self._failed(f"no answer within {self._read_timeout_s:g} s")
        if time.monotonic() - self._loaded_at < self._max_stale_s:
            return self._records
        stale = "" if self._loaded_at == float("-inf") else (
            f" and this replica's copy of the keys is older than key_max_stale_s ({self._max_stale_s:g} s)"
        )
        raise APIError(503, f"the API key store cannot be read right now{stale}, so no key can be checked; "
                            "retry shortly", code="key_store_unavailable")

    async def _load(self) -> None:
        try:
            records = await asyncio.to_thread(serve_keys.load_records, self._storage)
        except Exception as e:  # noqa: BLE001 - storage errors of any kind
            self._failed(f"{type(e).__name__}: {first_line(e)}")
            return
        self._records, self._loaded_at = records, time.monotonic()

    def _failed(self, reason: str) -> None:
        self._retry_at = time.monotonic() + KEY_RETRY_S
        logger.warning(
            "reading API keys from %s failed (%s); cached keys are %.1f s old, trusted up to key_max_stale_s=%g s",
            self._storage.uri, reason, time.monotonic() - self._loaded_at, self._max_stale_s,
        )


# --------------------------------------------------------------------------------------------------
# The deployment
# --------------------------------------------------------------------------------------------------


class _ModelCore:
    """One replica serving one model version (CPU float32, or the replica's GPU when it has one).

    The model work, validation and metrics; :class:`ModelServer` adds the HTTP routes (the ingress),
    :class:`ModelServerCanary` is the same without routes (one FastAPI ingress per application), reached
    through :meth:`handle_api` / :meth:`stream_api`.

    Args:
        args: the validated :class:`ServeAppArgs` as a dict (see :func:`build_app`).
        canary: deployment handle of the canary version's ``ModelServerCanary`` (only on the ingress of a
            traffic split), else None.

    Raises:
        FileNotFoundError: ``model_uri`` is a local path that does not exist or has no config.json.
        OSError: an ``s3://`` model could not be downloaded.
    """

    def __init__(self, args: dict, canary: Any = None) -> None:
        self._args = _parse_args(args)
        self._name = self._args.model_name
        self._served_id = f"{self._args.model_name}:{self._args.version}"
        self._created = int(time.time())
        self._tmpdir: Optional[str] = None
        self._gen_lock = threading.Lock()
        self._canary = canary
        split = self._args.canary
        self._canary_id = f"{self._name}:{split.version}" if split is not None and canary is not None else None
        self._canary_weight = split.weight_percent if self._canary_id else 0.0
        self._rng = random.Random()

        local = self._fetch_model(self._args.model_uri)
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        self._tokenizer = AutoTokenizer.from_pretrained(local)
        self._chat_template = bool(getattr(self._tokenizer, "chat_template", None))
        self._device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32)
        self._model = model.to(self._device).eval()
        self._eos_id: Optional[int] = self._tokenizer.eos_token_id
        pad = self._tokenizer.pad_token_id
        # No pad token: pad with eos (padding is masked out); no eos either: any id works as filler.
        self._pad_id: int = pad if pad is not None else (self._eos_id if self._eos_id is not None else 0)
        # Replace the checkpoint's generation defaults: request fields alone decide how to generate.
        self._model.generation_config = GenerationConfig(
            eos_token_id=self._eos_id, pad_token_id=self._pad_id, bos_token_id=self._tokenizer.bos_token_id
        )
        self._context = _context_length(self._model.config)

        self._keys = (
            _KeyCache(Storage.from_uri(self._args.storage_path), self._args.key_cache_ttl_s,
                      self._args.key_max_stale_s)
            if self._args.auth else None
        )
        self._metrics = _Metrics(self._name, self._args.version)

        self._generate_batch.set_max_batch_size(self._args.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(self._args.batch_wait_timeout_s)
        logger.info(
            "zeroplane ModelServer %s loaded from %s (context %s, device %s, auth %s, canary %s at %s%%)",
            self._served_id, self._args.model_uri, self._context, self._device, self._args.auth,
            self._canary_id, self._canary_weight,
        )

    def _fetch_model(self, uri: str) -> str:
        if uri.startswith("s3://"):
            storage = Storage.from_uri(uri)
            self._tmpdir = tempfile.mkdtemp(prefix="zeroplane-model-")
            storage.download_dir(storage.path(), self._tmpdir)
            local = Path(self._tmpdir)
        else:
            local = Path(os.path.expanduser(uri.removeprefix("file://")))
        if not (local / "config.json").is_file():
            raise FileNotFoundError(
                f"model_uri {uri!r} is not a Hugging Face model folder (no config.json in {local})"
            )
        return str(local)

    def __del__(self) -> None:
        tmp = getattr(self, "_tmpdir", None)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    # ---------------------------------------------------------------------------------- auth

    async def _authorize(self, request: Request) -> None:
        """Raise a 401 :class:`APIError` unless the request carries a valid, non-revoked bearer key."""
        if not self._args.auth:
            return
        challenge = {"WWW-Authenticate": "Bearer"}
        header = request.headers.get("authorization")
        if not header:
            raise APIError(
                401, "missing API key: send the header 'Authorization: Bearer <key>'",
                code="missing_api_key", headers=challenge,
            )
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise APIError(
                401, "malformed Authorization header: expected 'Bearer <key>'",
                code="invalid_api_key", headers=challenge,
            )
        if not serve_keys.verify_key(await self._keys.records(), token):
            raise APIError(401, "invalid or revoked API key", code="invalid_api_key", headers=challenge)

    # ---------------------------------------------------------------------------------- handle entry points

    async def handle_api(self, kind: str, body: Any) -> tuple[int, dict]:
        """Answer a non-streaming request forwarded by the ingress of a traffic split.

        Args:
            kind: ``"completions"`` or ``"chat"``.
            body: the decoded JSON body (already authorized by the ingress).

        Returns:
            ``(HTTP status, JSON body)`` — the answer, or the OpenAI error shape of a
            :class:`ZeroplaneError` (status ``http_status``).
        """
        try:
            return 200, await self._answer(kind, body, time.monotonic())
        except ZeroplaneError as e:
            return e.http_status, _error_body(e)

    async def stream_api(self, kind: str, body: Any) -> AsyncIterator[Union[dict, str]]:
        """Streaming twin of :meth:`handle_api`: first ``{"status", "error"?}``, then SSE text chunks."""
        async for item in self._stream(kind, body, time.monotonic()):
            yield item

    # ---------------------------------------------------------------------------------- dispatch

    async def _dispatch(self, kind: str, request: Request):
        started = time.monotonic()
        try:
            await self._authorize(request)
            body = await self._read_json(request)
        except ZeroplaneError as e:
            self._metrics.observe(kind, e.http_status, time.monotonic() - started)
            raise
        target = self._pick_target(body, request)
        streaming = isinstance(body, dict) and body.get("stream") is True
        if not streaming:
            if target is None:
                return await self._answer(kind, body, started)
            status, payload = await target.handle_api.remote(kind, body)
            return JSONResponse(status_code=status, content=payload)
        if target is None:
            events: Any = self._stream(kind, body, started)
        else:
            events = target.options(stream=True).stream_api.remote(kind, body)
        try:
            first = await events.__anext__()
        except BaseException:
            await _close_events(events)
            raise
        if first["status"] != 200:
            await _close_events(events)
            return JSONResponse(status_code=first["status"], content={"error": first["error"]})
        return StreamingResponse(
            _relay(events), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    def _pick_target(self, body: Any, request: Request) -> Any:
        """None to answer here, or the canary's handle: by a pinned ``model`` version, else by weight."""
        if self._canary_id is None:
            return None
        model = body.get("model") if isinstance(body, dict) else None
        if model == self._canary_id:
            return self._canary
        if model == self._served_id:
            return None
        request_id = request.headers.get("x-request-id")
        if request_id:
            draw = int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "big") / 2.0**64
        else:
            draw = self._rng.random()
        return self._canary if draw * 100.0 < self._canary_weight else None

    async def _answer(self, kind: str, body: Any, started: float) -> dict:
        """The JSON answer of a non-streaming request (metrics recorded). Raises :class:`APIError`."""
        try:
            p = self._prepare(kind, body, started)
            try:  # on timeout the batcher drops the cancelled jobs; a job already generating stops itself
                outs = await asyncio.wait_for(
                    asyncio.gather(*(self._generate_batch(p.job(i)) for i in range(p.n))),
                    p.deadline - time.monotonic(),
                )
            except asyncio.TimeoutError:
                outs = [None]
            if None in outs:
                raise _request_timeout(self._args.request_timeout_s)
        except ZeroplaneError as e:
            self._metrics.observe(kind, e.http_status, time.monotonic() - started)
            raise
        choices, completion_tokens = [], 0
        for i, new_ids in enumerate(outs):
            text, n_tokens, finish = self._finish(new_ids, p.max_tokens, p.stops)
            completion_tokens += n_tokens
            if kind == "chat":
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "finish_reason": finish, "logprobs": None})
            else:
                choices.append({"index": i, "text": text, "finish_reason": finish, "logprobs": None})
        self._metrics.observe(kind, 200, time.monotonic() - started, completion_tokens)
        return {
            "id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": self._served_id,
            "choices": choices,
            "usage": {
                "prompt_tokens": len(p.prompt_ids),
                "completion_tokens": completion_tokens,
                "total_tokens": len(p.prompt_ids) + completion_tokens,
            },
        }

    async def _stream(self, kind: str, body: Any, started: float) -> AsyncIterator[Union[dict, str]]:
        """``{"status": 200}`` then the SSE chunks of a streamed answer; or ``{"status": 4xx, "error"}``."""
        try:
            p = self._prepare(kind, body, started)
        except ZeroplaneError as e:
            self._metrics.observe(kind, e.http_status, time.monotonic() - started)
            yield {"status": e.http_status, **_error_body(e)}
            return
        yield {"status": 200}
        chat = kind == "chat"
        head = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": self._served_id,
        }

        def chunk(text: Optional[str], finish: Optional[str], first: bool = False) -> str:
            if chat:
                delta: dict = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            return _sse({**head, "choices": [choice]})

        state = _StreamState(p.prompt_ids, p.seed)
        status = 499  # until the stream completes: the client went away
        try:
            if chat:
                yield chunk(None, None, first=True)
            async for delta in self._stream_text(p, state):
                yield chunk(delta, None)
            yield chunk(None if chat else "", state.finish)
            if p.include_usage:
                usage = {"prompt_tokens": len(p.prompt_ids), "completion_tokens": state.n_tokens,
                         "total_tokens": len(p.prompt_ids) + state.n_tokens}
                yield _sse({**head, "choices": [], "usage": usage})
            yield "data: [DONE]\n\n"
            status = 200
        except ZeroplaneError as e:  # past request_timeout_s: the 200 is sent, so an error event ends the stream
            status = e.http_status
            yield _sse(_error_body(e))
        finally:
            self._metrics.observe(kind, status, time.monotonic() - started, state.n_tokens)

    # ---------------------------------------------------------------------------------- request parsing

    async def _read_json(self, request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise _body_too_large(length)
        # Count while reading and stop past the limit: a chunked body has no Content-Length to check first,
        # and reading it whole would let one request make the replica buffer any amount of data.
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise _body_too_large(f"over {MAX_BODY_BYTES}")
        if not raw.strip():
            raise APIError(400, "request body is empty; send a JSON object (see the OpenAI API for the fields)")
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}") from None
        except (ValueError, RecursionError) as e:  # e.g. an integer of thousands of digits, deep nesting
            raise APIError(400, f"request body is not acceptable JSON: {str(e)[:200]}") from None
        try:  # "\ud800" escapes decode to unpaired surrogates, which no tokenizer can take
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, "request body contains an unpaired UTF-16 surrogate escape (e.g. \\ud800); "
                                "send valid Unicode text") from None
        except RecursionError:
            raise APIError(400, "request body is nested too deeply") from None
        return body

    def _validate(self, body: Any, kind: str) -> Union[CompletionRequest, ChatCompletionRequest]:
        cap = self._args.max_tokens_cap
        schema = ChatCompletionRequest if kind == "chat" else CompletionRequest
        if not isinstance(body, dict):
            raise APIError(400, f"request body must be a JSON object, got {type(body).__name__}")
        try:
            req = schema.model_validate(body)
        except ValidationError as e:
            message, param = _validation_message(e.errors(), body, cap, list(schema.model_fields))
            raise APIError(400, message, param=param) from None
        hints = _field_hints(cap)
        if req.model is not None and req.model not in (self._name, self._served_id, self._canary_id):
            served = ", ".join(repr(m) for m in (self._name, self._served_id, self._canary_id) if m)
            raise APIError(
                404,
                f"model {req.model!r} not found; this endpoint serves {self._name!r} "
                f"(version {self._args.version}): use 'model' one of {served}",
                param="model", code="model_not_found",
            )
        if isinstance(req, CompletionRequest):
            if isinstance(req.prompt, list) and len(req.prompt) != 1:
                raise APIError(
                    400, f"'prompt' must be {hints['prompt']}; got a list of {len(req.prompt)}", param="prompt"
                )
            prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
            if not prompt:
                raise APIError(400, f"'prompt' must be {hints['prompt']}; got an empty string", param="prompt")
            if req.echo:
                raise APIError(400, f"'echo' must be {hints['echo']}", param="echo")
        else:
            if req.max_tokens is not None and req.max_completion_tokens is not None:
                raise APIError(
                    400, "give either 'max_tokens' or 'max_completion_tokens', not both", param="max_completion_tokens"
                )
        for field in ("max_tokens", "max_completion_tokens"):
            value = getattr(req, field, None)
            if value is not None and value > cap:
                raise APIError(
                    400, f"'{field}' is {value}, over this deployment's limit of {cap} (max_tokens_cap)", param=field
                )
        if req.stream and req.n != 1:
            raise APIError(400, f"'n' must be 1 when 'stream' is true; got {req.n}", param="n")
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")
        return req

    def _prepare(self, kind: str, body: Any, started: float) -> _Prepared:
        """Validate ``body`` and tokenize its prompt; ``started`` is the request's ``time.monotonic()`` arrival
        (its deadline is ``request_timeout_s`` later). Raises :class:`APIError` (4xx) for any mistake."""
        req = self._validate(body, kind)
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if isinstance(req, ChatCompletionRequest):
            messages = [{"role": m.role, "content": m.content} for m in req.messages]
            if self._chat_template:
                try:
                    prompt = self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                except Exception as e:  # noqa: BLE001 - a template may reject a message order
                    raise APIError(400, f"'messages' do not fit this model's chat template: {e}", param="messages") from None
            else:
                prompt = default_chat_prompt(messages)
                stops += list(DEFAULT_CHAT_STOPS)
            max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            param = "messages"
        else:
            prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
            max_tokens = req.max_tokens
            param = "prompt"
        if max_tokens is None:
            max_tokens = min(DEFAULT_MAX_TOKENS, self._args.max_tokens_cap)

        prompt_ids = list(self._tokenizer(prompt)["input_ids"])
        if not prompt_ids:
            raise APIError(400, f"'{param}' encodes to zero tokens; send some text", param=param)
        if self._context is not None and len(prompt_ids) + max_tokens > self._context:
            room = self._context - max_tokens
            raise APIError(
                400,
                f"'{param}' is {len(prompt_ids)} tokens; with max_tokens={max_tokens} that is "
                f"{len(prompt_ids) + max_tokens} tokens, over the model's context of {self._context} tokens; "
                f"shorten the {param} to at most {max(room, 0)} tokens or lower max_tokens",
                param=param, code="context_length_exceeded",
            )
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _Prepared(kind, prompt_ids, max_tokens, stops, req.temperature, req.top_p, req.seed, req.n,
                         req.stream, include_usage, started + self._args.request_timeout_s)

    # ---------------------------------------------------------------------------------- generation

    @serve.batch(max_batch_size=_SERVE_DEFAULTS.max_batch_size,
                 batch_wait_timeout_s=_SERVE_DEFAULTS.batch_wait_timeout_s)
    async def _generate_batch(self, jobs: list[_Job]) -> list[Optional[list[int]]]:
        """Generate for a batch of requests; returns each request's new token ids (may end with eos), or
        None for a request that reached its deadline first."""
        return await asyncio.to_thread(self._run_jobs, jobs)

    def _run_jobs(self, jobs: list[_Job]) -> list[Optional[list[int]]]:
        results: list[Optional[list[int]]] = [None] * len(jobs)  # None: past the deadline (skipped or stopped)
        groups = self._greedy_groups(jobs)
        logger.debug(
            "generating a batch of %d requests: greedy groups %s, %d sampled",
            len(jobs), [len(g) for g in groups], sum(not j.greedy for j in jobs),
        )
        with self._gen_lock, torch.inference_mode():
            for group in groups:
                group = [i for i in group if not jobs[i].expired]
                if not group:
                    continue
                outs = self._generate([jobs[i] for i in group], max(jobs[i].max_tokens for i in group))
                for i, out in zip(group, outs):
                    results[i] = None if jobs[i].expired else out[: jobs[i].max_tokens]
            for i, job in enumerate(jobs):
                if not job.greedy and not job.expired:
                    seed = job.seed if job.seed is not None else secrets.randbits(63)
                    torch.manual_seed(seed)  # global RNG: safe, generation is serialized by _gen_lock
                    out = self._generate([job], job.max_tokens, temperature=job.temperature, top_p=job.top_p)[0]
                    results[i] = None if job.expired else out
        return results

    def _greedy_groups(self, jobs: list[_Job]) -> list[list[int]]:
        """Indices of greedy jobs split into groups whose padded prompt + longest output fits the context."""
        groups: list[list[int]] = []
        current: list[int] = []
        longest_prompt = most_new = 0
        for i, job in enumerate(jobs):
            if not job.greedy:
                continue
            lp = max(longest_prompt, len(job.prompt_ids))
            mn = max(most_new, job.max_tokens)
            if current and self._context is not None and lp + mn > self._context:
                groups.append(current)
                current, lp, mn = [], len(job.prompt_ids), job.max_tokens
            current.append(i)
            longest_prompt, most_new = lp, mn
        if current:
            groups.append(current)
        return groups

    def _generate(
        self,
        jobs: list[_Job],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
    ) -> list[list[int]]:
        """Left-pad the jobs' prompts and run one ``generate``; returns each row's new ids
        (``<= max_new_tokens``; fewer for a row stopped at its job's deadline)."""
        from transformers import GenerationConfig, StoppingCriteriaList

        prompts = [job.prompt_ids for job in jobs]
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[self._pad_id] * (width - len(p)) + p for p in prompts], dtype=torch.long)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max_new_tokens, eos_token_id=self._eos_id, pad_token_id=self._pad_id
        )
        if temperature >= GREEDY_TEMPERATURE_EPS:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        else:
            kwargs.update(do_sample=False)
        out = self._model.generate(
            input_ids=input_ids.to(self._device),
            attention_mask=attention.to(self._device),
            generation_config=GenerationConfig(**kwargs),
            stopping_criteria=StoppingCriteriaList([_PastDeadline([job.deadline for job in jobs])]),
        )
        return [row[width:].tolist() for row in out.cpu()]

    def _finish(self, new_ids: list[int], max_tokens: int, stops: list[str]) -> tuple[str, int, str]:
        """Cut the new tokens at eos and stop strings: ``(text, completion_tokens, finish_reason)``."""
        ids = new_ids[:max_tokens]
        finish = "length"
        if self._eos_id is not None and self._eos_id in ids:
            ids = ids[: ids.index(self._eos_id) + 1]  # the eos counts as a generated token
            finish = "stop"
        text = self._tokenizer.decode(ids, skip_special_tokens=True)
        n_tokens = len(ids)
        cut = min((text.find(s) for s in stops if s in text), default=-1)
        if cut >= 0:
            end_of_stop = min(text.find(s) + len(s) for s in stops if s in text and text.find(s) == cut)
            text = text[:cut]
            finish = "stop"
            # Tokens a server that stops on the string would have generated: up to the one completing it.
            for k in range(1, len(ids) + 1):
                if len(self._tokenizer.decode(ids[:k], skip_special_tokens=True)) >= end_of_stop:
                    n_tokens = k
                    break
        return text, n_tokens, finish

    # ---------------------------------------------------------------------------------- streaming

    async def _stream_text(self, p: _Prepared, state: _StreamState) -> AsyncIterator[str]:
        """Generate one choice token by token, yielding text deltas; sets ``state.n_tokens``/``finish``.

        Text that could be the start of a stop string (or an incomplete UTF-8 character) is held back
        until it is known not to be; the text is cut before the first stop string, like :meth:`_finish`.
        Each token is one forward pass in a worker thread under the generation lock, so cancelling the
        consumer (a client disconnect) stops generation after at most the token in flight.
        """
        ids: list[int] = []
        emitted = 0
        text = ""
        for _ in range(p.max_tokens):
            token = await asyncio.to_thread(self._next_token, state, p)
            ids.append(token)
            state.n_tokens = len(ids)
            if self._eos_id is not None and token == self._eos_id:
                state.finish = "stop"
                break
            text = self._tokenizer.decode(ids, skip_special_tokens=True)
            cut = min((text.find(s) for s in p.stops if s in text), default=-1)
            if cut >= 0:
                state.finish = "stop"
                text = text[:cut]
                break
            safe = len(text) - _stop_holdback(text, p.stops)
            if text.endswith("\ufffd"):
                safe = min(safe, len(text) - 1)
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
        else:
            text = self._tokenizer.decode(ids, skip_special_tokens=True)
        if state.finish == "stop" and self._eos_id is not None and ids and ids[-1] == self._eos_id:
            text = self._tokenizer.decode(ids, skip_special_tokens=True)
        if len(text) > emitted:
            yield text[emitted:]

    def _next_token(self, state: _StreamState, p: _Prepared) -> int:
        """One forward pass with the KV cache; returns the next token id (greedy or sampled).

        Raises:
            APIError: 504 once the request is past its deadline (also while waiting for the model).
        """
        remaining = p.deadline - time.monotonic()
        if remaining <= 0 or not self._gen_lock.acquire(timeout=remaining):
            raise _request_timeout(self._args.request_timeout_s)
        try:
            return self._next_token_locked(state, p)
        finally:
            self._gen_lock.release()

    def _next_token_locked(self, state: _StreamState, p: _Prepared) -> int:
        with torch.inference_mode():
            out = self._model(input_ids=state.next_input.to(self._device), past_key_values=state.past, use_cache=True)
            state.past = out.past_key_values
            logits = out.logits[0, -1].float().cpu()
            if p.temperature < GREEDY_TEMPERATURE_EPS:
                token = int(torch.argmax(logits))
            else:
                probs = torch.softmax(logits / p.temperature, dim=-1)
                if p.top_p < 1.0:
                    sorted_probs, order = torch.sort(probs, descending=True)
                    keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < p.top_p
                    keep[0] = True  # a top_p below float32's range still keeps the likeliest token
                    probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
                token = int(torch.multinomial(probs, 1, generator=state.generator))
            state.next_input = torch.tensor([[token]], dtype=torch.long)
        return token


@serve.deployment(name=DEPLOYMENT)
@serve.ingress(_api)
class ModelServer(_ModelCore):
    """The HTTP ingress of an application: :class:`_ModelCore` plus the OpenAI-style routes."""

    # ---------------------------------------------------------------------------------- routes

    @_api.get("/healthz")
    async def healthz(self) -> dict:
        """Liveness; no key needed. Returns ``{"status": "ok", "model": "<name>:<version>"}``."""
        return {"status": "ok", "model": self._served_id}

    @_api.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        """OpenAI-style model list: this version, plus the canary version and both weights in a split."""
        await self._authorize(request)
        entry = {
            "id": self._served_id,
            "object": "model",
            "created": self._created,
            "owned_by": "zeroplane",
            "root": self._name,
            "version": self._args.version,
            "context_length": self._context,
            "max_tokens_cap": self._args.max_tokens_cap,
        }
        data = [entry]
        if self._canary_id is not None:
            entry["weight_percent"] = 100.0 - self._canary_weight
            data.append({**entry, "id": self._canary_id, "version": self._args.canary.version,
                         "weight_percent": self._canary_weight})
        return {"object": "list", "data": data}

    @_api.get("/metrics")
    async def metrics(self, request: Request) -> PlainTextResponse:
        """This replica's request metrics in Prometheus text format (see :class:`_Metrics`)."""
        await self._authorize(request)
        return PlainTextResponse(self._metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @_api.post("/v1/completions")
    async def completions(self, request: Request):
        """OpenAI-style text completion; see :class:`CompletionRequest` for the body."""
        return await self._dispatch("completions", request)

    @_api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        """OpenAI-style chat completion; see :class:`ChatCompletionRequest` for the body."""
        return await self._dispatch("chat", request)



@serve.deployment(name=CANARY_DEPLOYMENT)
class ModelServerCanary(_ModelCore):
    """The canary version of a traffic split (no HTTP routes: the ingress forwards through a handle)."""


def build_app(args: dict) -> serve.Application:
    """Serve application builder for one model version (``zeroplane.runtime.serve.app:build_app``).

    Args:
        args: JSON values, validated by :class:`ServeAppArgs`:
            ``model_name`` (str), ``version`` (str, e.g. ``"v1"``), ``model_uri`` (local folder or
            ``s3://`` URI of a Hugging Face model folder), ``storage_path`` (storage root with
            ``serve/api_keys.json``; required when ``auth``), ``auth`` (bool, default true),
            ``max_tokens_cap`` (int, default 256), ``max_batch_size`` (int, default 8),
            ``batch_wait_timeout_s`` (float seconds, default 0.01), ``key_cache_ttl_s`` (float
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
    cfg = _parse_args(args)
    ongoing = max(16, 2 * cfg.max_batch_size)
    canary = None
    if cfg.canary is not None:
        canary_args = cfg.model_copy(update={
            "version": cfg.canary.version, "model_uri": cfg.canary.model_uri, "canary": None,
        }).model_dump()
        canary = ModelServerCanary.options(max_ongoing_requests=ongoing).bind(canary_args)
    return ModelServer.options(max_ongoing_requests=ongoing).bind(cfg.model_dump(), canary)
