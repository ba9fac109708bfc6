"""Ray Serve application: one model version behind OpenAI-style HTTP routes.

Deployed as ``zeroplane.runtime.serve.app:build_app`` (a Serve *application builder*) with a route
prefix ``/<model_name>``. Routes, relative to that prefix:

* ``POST /v1/completions`` — OpenAI-style text completion (see :class:`CompletionRequest`).
* ``GET /v1/models`` — the one model this application serves.
* ``GET /healthz`` — liveness, never needs a key.

Auth: with ``auth`` on (the default) every route but ``/healthz`` needs ``Authorization: Bearer <key>``
for a non-revoked key of ``<storage_path>/serve/api_keys.json`` (see :mod:`zeroplane.serve_keys`). The
key is checked before the body is read or any model work is done. Each replica caches the key file and
re-reads it at most every ``key_cache_ttl_s`` (5 s), so a new or revoked key takes effect within that.

Errors: every client mistake gets a 4xx with the OpenAI error shape
``{"error": {"message", "type": "invalid_request_error", "param", "code"}}`` whose message names the
field and the limit; 401 bad/missing key, 404 unknown model, 413 oversized body, 400 anything else.

Generation (per replica): requests are queued through ``@serve.batch``. Greedy requests
(``temperature == 0``) in a batch are left-padded into one ``generate`` call (grouped so that every row
fits the context window), run to the longest ``max_tokens`` of the group and cut per request. Sampled
requests run one by one with their own seed (random when not given) so that a seeded request gives the
same text whatever else is in the batch. All model work runs in one worker thread under a lock, so the
replica's event loop keeps answering ``/healthz`` meanwhile; the tokenizer is only used on the event
loop thread (Hugging Face fast tokenizers are not safe under concurrent use).

Deployment options (``num_replicas``/``autoscaling_config``, ``ray_actor_options``) come from the Serve
config; the code only names the deployment ``ModelServer`` and raises ``max_ongoing_requests`` so that a
replica can hold a full batch.
"""

# No ``from __future__ import annotations`` here: @serve.ingress ships the routes to replicas with
# cloudpickle, which keeps only the globals a function's code uses, so FastAPI could not resolve a
# string annotation such as "Request" there and would treat ``request`` as a query parameter.
import asyncio
import json
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from zeroplane import serve_keys
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
_MAX_SEED = 2**63 - 1


# --------------------------------------------------------------------------------------------------
# Application arguments
# --------------------------------------------------------------------------------------------------


class ServeAppArgs(BaseModel):
    """Arguments of :func:`build_app` (the ``args`` of the Serve config's application entry).

    Unknown keys are rejected so that a misspelled option fails the deploy instead of being ignored.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_name: str = Field(min_length=1, description="Model name; also the route prefix '/<model_name>'.")
    version: str = Field(min_length=1, description="Model version served, e.g. 'v1'.")
    model_uri: str = Field(
        min_length=1,
        description="Local folder or s3:// URI of a Hugging Face model folder (config, weights, tokenizer).",
    )
    storage_path: Optional[str] = Field(
        None, description="Storage root holding serve/api_keys.json; required when auth is on."
    )
    auth: bool = Field(True, description="Require 'Authorization: Bearer <key>' on every route but /healthz.")
    max_tokens_cap: int = Field(256, ge=1, description="Largest max_tokens a request may ask for (new tokens).")
    max_batch_size: int = Field(8, ge=1, description="Most requests generated together by one replica.")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, description="Seconds a replica waits to fill a batch before generating."
    )
    key_cache_ttl_s: float = Field(
        5.0, ge=0, description="Seconds a replica keeps the API key file before re-reading it."
    )

    @model_validator(mode="after")
    def _storage_needed_for_auth(self) -> "ServeAppArgs":
        if self.auth and not self.storage_path:
            raise ValueError(
                "storage_path is required when auth is true (API keys live in <storage_path>/serve/api_keys.json); "
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


class CompletionRequest(BaseModel):
    """Body of ``POST /v1/completions`` (a subset of OpenAI's, strictly typed, unknown fields rejected).

    Attributes:
        model: optional; must be ``<model_name>`` or ``<model_name>:<version>`` when given (else 404).
        prompt: a non-empty string, or a list with exactly one string.
        max_tokens: number of NEW tokens to generate, 1..``max_tokens_cap``; default 16.
        temperature: 0..2; 0 is greedy decoding; default 1.0.
        top_p: nucleus sampling mass, 0 < top_p <= 1; default 1.0.
        seed: 0..2**63-1; makes sampling reproducible on a given replica/model.
        stop: a string or up to 4 non-empty strings; the text is cut before the first one found.
        n: must be 1. stream: must be false. echo: must be false. user: accepted and ignored.
    """

    model_config = ConfigDict(extra="forbid", strict=True, protected_namespaces=())

    model: Optional[str] = None
    prompt: Union[str, list[str]]
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    seed: Optional[int] = Field(None, ge=0, le=_MAX_SEED)
    stop: Optional[Union[str, list[str]]] = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    echo: bool = False
    user: Optional[str] = None


def _field_hints(cap: Optional[int]) -> dict[str, str]:
    return {
        "model": "a string naming the served model",
        "prompt": "a non-empty string, or a list holding exactly one string",
        "max_tokens": (
            f"an integer from 1 to {cap} (max_tokens_cap of this deployment)" if cap else "an integer of at least 1"
        ),
        "temperature": "a number from 0 to 2 (0 = greedy)",
        "top_p": "a number greater than 0 and at most 1",
        "seed": f"an integer from 0 to {_MAX_SEED}",
        "stop": f"a non-empty string or a list of at most {MAX_STOP_STRINGS} non-empty strings",
        "n": "1 (one choice per request)",
        "stream": "false (streaming is not supported by /v1/completions here)",
        "echo": "false (echo is not supported)",
        "user": "a string",
    }


class APIError(Exception):
    """A request failure answered with the OpenAI error JSON.

    Args:
        status: HTTP status code (4xx for client mistakes).
        message: one line naming the field and the limit or the fix.
        param: the offending request field, if any.
        code: a short machine-readable code, e.g. ``"invalid_api_key"``.
        type_: OpenAI error type; ``"invalid_request_error"`` for client mistakes.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: Optional[str] = None,
        code: Optional[str] = None,
        type_: str = "invalid_request_error",
        headers: Optional[dict[str, str]] = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_
        self.headers = headers


def _error_response(
    status: int,
    message: str,
    *,
    param: Optional[str] = None,
    code: Optional[str] = None,
    type_: str = "invalid_request_error",
    headers: Optional[dict[str, str]] = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(status_code=status, content=body, headers=headers)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _validation_message(errors: list[dict], body: Any, cap: Optional[int]) -> tuple[str, Optional[str]]:
    """One line for the first pydantic error: ``(message, offending field)``."""
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
        return f"unknown field '{field}'; supported fields: {', '.join(hints)}", field
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
@_api.exception_handler(APIError)
async def _api_error_handler(request: Request, exc: APIError) -> JSONResponse:
    return _error_response(
        exc.status, exc.message, param=exc.param, code=exc.code, type_=exc.type, headers=exc.headers
    )


@_api.exception_handler(RequestValidationError)
async def _request_validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = _validation_message(list(exc.errors()), getattr(exc, "body", None), cap=None)
    return _error_response(400, message, param=param, code="invalid_request")


@_api.exception_handler(StarletteHTTPException)
async def _http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    routes = "routes: POST /v1/completions, GET /v1/models, GET /healthz"
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}; {routes}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}; {routes}"
    else:
        message = str(exc.detail)
    return _error_response(
        exc.status_code,
        message,
        type_="invalid_request_error" if exc.status_code < 500 else "server_error",
        headers=getattr(exc, "headers", None),
    )


@_api.exception_handler(Exception)
async def _server_error_handler(request: Request, exc: Exception) -> JSONResponse:
    # Starlette still re-raises after answering, so the traceback lands in the replica log.
    return _error_response(
        500, f"internal error ({type(exc).__name__}); see the replica logs", type_="server_error"
    )


# --------------------------------------------------------------------------------------------------
# Generation work items
# --------------------------------------------------------------------------------------------------


@dataclass
class _Job:
    """One request's generation work: prompt token ids (1-D), NEW tokens wanted, sampling settings."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: Optional[int]

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS


def _context_length(config: Any) -> Optional[int]:
    for attr in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# --------------------------------------------------------------------------------------------------
# The deployment
# --------------------------------------------------------------------------------------------------


@serve.deployment(name="ModelServer")
@serve.ingress(_api)
class ModelServer:
    """One replica serving one model version (CPU float32, or the replica's GPU when it has one).

    Args:
        args: the validated :class:`ServeAppArgs` as a dict (see :func:`build_app`).

    Raises:
        FileNotFoundError: ``model_uri`` is a local path that does not exist or has no config.json.
        OSError: an ``s3://`` model could not be downloaded.
    """

    def __init__(self, args: dict) -> None:
        self._args = _parse_args(args)
        self._name = self._args.model_name
        self._served_id = f"{self._args.model_name}:{self._args.version}"
        self._created = int(time.time())
        self._tmpdir: Optional[str] = None
        self._gen_lock = threading.Lock()

        local = self._fetch_model(self._args.model_uri)
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        self._tokenizer = AutoTokenizer.from_pretrained(local)
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

        self._keys_storage = Storage.from_uri(self._args.storage_path) if self._args.auth else None
        self._keys_records: Optional[list[dict]] = None
        self._keys_loaded_at = float("-inf")
        self._keys_lock: Optional[asyncio.Lock] = None

        self._generate_batch.set_max_batch_size(self._args.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(self._args.batch_wait_timeout_s)
        logger.info(
            "zeroplane ModelServer %s loaded from %s (context %s, device %s, auth %s)",
            self._served_id, self._args.model_uri, self._context, self._device, self._args.auth,
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

    async def _key_records(self) -> list[dict]:
        if self._keys_lock is None:
            self._keys_lock = asyncio.Lock()
        async with self._keys_lock:
            now = time.monotonic()
            if self._keys_records is not None and now - self._keys_loaded_at < self._args.key_cache_ttl_s:
                return self._keys_records
            try:
                self._keys_records = await asyncio.to_thread(serve_keys.load_records, self._keys_storage)
                self._keys_loaded_at = time.monotonic()
            except Exception as e:  # noqa: BLE001 - storage errors of any kind
                if self._keys_records is None:
                    logger.error("cannot read API keys from %s: %s", self._keys_storage.uri, e)
                    raise APIError(
                        503, "the API key store cannot be read right now; retry shortly",
                        type_="server_error", code="key_store_unavailable",
                    ) from None
                logger.warning("re-reading API keys failed (%s); keeping the cached keys for 1 s more", e)
                self._keys_loaded_at = now - self._args.key_cache_ttl_s + 1.0
            return self._keys_records

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
        if not serve_keys.verify_key(await self._key_records(), token):
            raise APIError(401, "invalid or revoked API key", code="invalid_api_key", headers=challenge)

    # ---------------------------------------------------------------------------------- routes

    @_api.get("/healthz")
    async def healthz(self) -> dict:
        """Liveness; no key needed. Returns ``{"status": "ok", "model": "<name>:<version>"}``."""
        return {"status": "ok", "model": self._served_id}

    @_api.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        """OpenAI-style model list holding this application's one model version."""
        await self._authorize(request)
        return {
            "object": "list",
            "data": [
                {
                    "id": self._served_id,
                    "object": "model",
                    "created": self._created,
                    "owned_by": "zeroplane",
                    "root": self._name,
                    "version": self._args.version,
                    "context_length": self._context,
                    "max_tokens_cap": self._args.max_tokens_cap,
                }
            ],
        }

    @_api.post("/v1/completions")
    async def completions(self, request: Request) -> dict:
        """OpenAI-style text completion; see :class:`CompletionRequest` for the body."""
        await self._authorize(request)
        body = await self._read_json(request)
        req = self._validate(body)
        prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
        max_tokens = req.max_tokens
        if max_tokens is None:
            max_tokens = min(DEFAULT_MAX_TOKENS, self._args.max_tokens_cap)
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])

        prompt_ids = list(self._tokenizer(prompt)["input_ids"])
        if not prompt_ids:
            raise APIError(400, "'prompt' encodes to zero tokens; send some text", param="prompt")
        if self._context is not None and len(prompt_ids) + max_tokens > self._context:
            room = self._context - max_tokens
            raise APIError(
                400,
                f"'prompt' is {len(prompt_ids)} tokens; with max_tokens={max_tokens} that is "
                f"{len(prompt_ids) + max_tokens} tokens, over the model's context of {self._context} tokens; "
                f"shorten the prompt to at most {max(room, 0)} tokens or lower max_tokens",
                param="prompt", code="context_length_exceeded",
            )

        job = _Job(prompt_ids, max_tokens, req.temperature, req.top_p, req.seed)
        new_ids = await self._generate_batch(job)
        text, n_tokens, finish = self._finish(new_ids, max_tokens, stops)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self._served_id,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
            "usage": {
                "prompt_tokens": len(prompt_ids),
                "completion_tokens": n_tokens,
                "total_tokens": len(prompt_ids) + n_tokens,
            },
        }

    # ---------------------------------------------------------------------------------- request parsing

    async def _read_json(self, request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise APIError(413, f"request body is {length} bytes; the limit is {MAX_BODY_BYTES} bytes")
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise APIError(413, f"request body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES} bytes")
        if not raw.strip():
            raise APIError(400, "request body is empty; send a JSON object with at least 'prompt'")
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}") from None

    def _validate(self, body: Any) -> CompletionRequest:
        cap = self._args.max_tokens_cap
        if not isinstance(body, dict):
            raise APIError(400, f"request body must be a JSON object, got {type(body).__name__}")
        try:
            req = CompletionRequest.model_validate(body)
        except ValidationError as e:
            message, param = _validation_message(e.errors(), body, cap)
            raise APIError(400, message, param=param) from None
        hints = _field_hints(cap)
        if req.model is not None and req.model not in (self._name, self._served_id):
            raise APIError(
                404,
                f"model {req.model!r} not found; this endpoint serves {self._name!r} "
                f"(version {self._args.version}): use 'model': {self._name!r} or {self._served_id!r}",
                param="model", code="model_not_found",
            )
        if isinstance(req.prompt, list) and len(req.prompt) != 1:
            raise APIError(
                400, f"'prompt' must be {hints['prompt']}; got a list of {len(req.prompt)}", param="prompt"
            )
        prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
        if not prompt:
            raise APIError(400, f"'prompt' must be {hints['prompt']}; got an empty string", param="prompt")
        if req.max_tokens is not None and req.max_tokens > cap:
            raise APIError(
                400,
                f"'max_tokens' is {req.max_tokens}, over this deployment's limit of {cap} (max_tokens_cap)",
                param="max_tokens",
            )
        if req.stop is not None:
            stops = [req.stop] if isinstance(req.stop, str) else req.stop
            if len(stops) > MAX_STOP_STRINGS or not all(stops):
                raise APIError(400, f"'stop' must be {hints['stop']}; got {_short(req.stop)}", param="stop")
        if req.stream:
            raise APIError(400, f"'stream' must be {hints['stream']}", param="stream")
        if req.echo:
            raise APIError(400, f"'echo' must be {hints['echo']}", param="echo")
        return req

    # ---------------------------------------------------------------------------------- generation

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _generate_batch(self, jobs: list[_Job]) -> list[list[int]]:
        """Generate for a batch of requests; returns each request's new token ids (may end with eos)."""
        return await asyncio.to_thread(self._run_jobs, jobs)

    def _run_jobs(self, jobs: list[_Job]) -> list[list[int]]:
        results: list[Optional[list[int]]] = [None] * len(jobs)
        groups = self._greedy_groups(jobs)
        logger.debug(
            "generating a batch of %d requests: greedy groups %s, %d sampled",
            len(jobs), [len(g) for g in groups], sum(not j.greedy for j in jobs),
        )
        with self._gen_lock, torch.inference_mode():
            for group in groups:
                outs = self._generate([jobs[i].prompt_ids for i in group], max(jobs[i].max_tokens for i in group))
                for i, out in zip(group, outs):
                    results[i] = out[: jobs[i].max_tokens]
            for i, job in enumerate(jobs):
                if not job.greedy:
                    seed = job.seed if job.seed is not None else secrets.randbits(63)
                    torch.manual_seed(seed)  # global RNG: safe, generation is serialized by _gen_lock
                    results[i] = self._generate(
                        [job.prompt_ids], job.max_tokens, temperature=job.temperature, top_p=job.top_p
                    )[0]
        return results  # type: ignore[return-value]

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
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
    ) -> list[list[int]]:
        """Left-pad ``prompts`` and run one ``generate``; returns each row's new ids (``<= max_new_tokens``)."""
        from transformers import GenerationConfig

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


def build_app(args: dict) -> serve.Application:
    """Serve application builder for one model version (``zeroplane.runtime.serve.app:build_app``).

    Args:
        args: JSON values, validated by :class:`ServeAppArgs`:
            ``model_name`` (str), ``version`` (str, e.g. ``"v1"``), ``model_uri`` (local folder or
            ``s3://`` URI of a Hugging Face model folder), ``storage_path`` (storage root with
            ``serve/api_keys.json``; required when ``auth``), ``auth`` (bool, default true),
            ``max_tokens_cap`` (int, default 256), ``max_batch_size`` (int, default 8),
            ``batch_wait_timeout_s`` (float seconds, default 0.01), ``key_cache_ttl_s`` (float
            seconds, default 5).

    Returns:
        The bound ``ModelServer`` deployment, to be run with ``route_prefix="/<model_name>"``.
        ``max_ongoing_requests`` defaults to ``max(16, 2 * max_batch_size)`` per replica so a full
        batch can form; a Serve config that sets it wins.

    Raises:
        ValueError: a missing, misspelled or out-of-range argument (the message names it).
    """
    cfg = _parse_args(args)
    deployment = ModelServer.options(max_ongoing_requests=max(16, 2 * cfg.max_batch_size))
    return deployment.bind(cfg.model_dump())
