"""The OpenAI-style wire protocol of a model server: application arguments, request bodies, their validation
messages and the error shape.

Imports neither torch nor Ray (nor FastAPI), so the request rules are unit-tested without a replica
(``tests/unit/test_serve_requests.py``). Every client mistake becomes an :class:`APIError` whose message names
the field, the value and the limit or fix; :func:`error_body` is the OpenAI error JSON of any
:class:`zeroplane.errors.ZeroplaneError`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from zeroplane.errors import ZeroplaneError
from zeroplane.layout import KEYS_FILE
from zeroplane.spec.model import ServeSpec

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
#: Largest ``seed`` (a non-negative signed 64-bit integer, as OpenAI's API and torch's generators take).
MAX_SEED = 2**63 - 1


# --------------------------------------------------------------------------------------------------
# Application arguments
# --------------------------------------------------------------------------------------------------


class CanaryArgs(BaseModel):
    """The canary version of a traffic split (``canary`` of :class:`ServeAppArgs`)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    version: str = Field(min_length=1, description="Canary model version, e.g. 'v2'.")
    model_uri: str = Field(min_length=1, description="Local folder or s3:// URI of the canary's model folder.")
    weight_percent: float = Field(
        ge=0, lt=100, description="Percent of requests (not pinned to a version) sent to the canary; 0 <= w < 100. "
        "0 is the drain step of a rollout that removes the canary (:func:`zeroplane.releases.rollout`): "
        "the ingress no longer routes to it while the old ingress replicas finish.",
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
    ``auth``, ``max_tokens_cap``, ``max_batch_size``, ``batch_wait_timeout_s`` and ``engine`` take their
    defaults and bounds from :class:`zeroplane.spec.model.ServeSpec` (the job spec's ``serve`` section).
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
    engine: Literal["continuous", "generate"] = _serve_spec_field(
        "engine", "Generation engine of each replica (see zeroplane.runtime.serve.engine)."
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
        if self.canary is not None and self.canary.version == self.version and self.canary.weight_percent > 0:
            raise ValueError(
                f"canary.version {self.canary.version!r} equals version; a canary must be another version"
            )
        if self.auth and not self.storage_path:
            raise ValueError(
                f"storage_path is required when auth is true (API keys live in <storage_path>/{KEYS_FILE}); "
                "pass storage_path or set auth: false"
            )
        return self


def parse_args(args: Any) -> ServeAppArgs:
    """``args`` (a dict of JSON values, or already a :class:`ServeAppArgs`) validated.

    Raises:
        ValueError: ``invalid zeroplane serve app args: <field>: <problem>; ...`` for every problem.
    """
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
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)
    stop: Optional[Union[_StopString, Annotated[list[_StopString], Field(max_length=MAX_STOP_STRINGS)]]] = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: Optional["StreamOptions"] = None
    user: Optional[str] = None
    # OpenAI fields that clients send at their neutral values; any other value is refused by
    # check_neutral_fields (the engine cannot honour it).
    frequency_penalty: float = Field(0.0, allow_inf_nan=False)
    presence_penalty: float = Field(0.0, allow_inf_nan=False)
    logit_bias: Optional[dict[str, float]] = None


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
        frequency_penalty, presence_penalty: accepted at 0 only; logit_bias: null or ``{}`` only;
            logprobs: null only; best_of: null or 1; suffix: null only (see :func:`check_neutral_fields`).
    """

    prompt: Union[str, list[str]]
    echo: bool = False
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class StreamOptions(BaseModel):
    """``stream_options`` of a streaming request."""

    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class ContentPart(BaseModel):
    """One part of a message's content list: only text parts (``{"type": "text", "text": "..."}``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat message: ``role`` and its text ``content``.

    ``role`` is system, user, assistant, or developer (OpenAI's newer name for system instructions; given
    to chat templates as ``system``, which they know). ``content`` is a string or a list of text parts,
    joined with newlines (as vLLM joins them).
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[ContentPart]]
    name: Optional[str] = None

    def as_template_message(self) -> dict:
        """``{"role", "content"}`` for a chat template: content as one string, developer as system."""
        content = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(_SamplingRequest):
    """Body of ``POST /v1/chat/completions``; fields as :class:`CompletionRequest` except:

    Attributes:
        messages: 1 or more :class:`ChatMessage`; rendered into one prompt (see the module docstring).
        max_completion_tokens: OpenAI's newer name for ``max_tokens`` (give at most one of the two).
        logprobs: null or false only; top_logprobs: null or 0 only (see :func:`check_neutral_fields`).
    """

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None


_SamplingRequest.model_rebuild()
CompletionRequest.model_rebuild()
ChatCompletionRequest.model_rebuild()

#: Fields accepted only at a neutral value: field -> (is the value neutral?, what is accepted, why not more).
_NEUTRAL: dict[str, tuple[Any, str, str]] = {
    "frequency_penalty": (lambda v: v == 0, "0", "this server applies no frequency penalty"),
    "presence_penalty": (lambda v: v == 0, "0", "this server applies no presence penalty"),
    "logit_bias": (lambda v: not v, "null or {}", "this server applies no logit bias"),
    "logprobs": (lambda v: v is None or v is False, "null (or false in a chat request)",
                 "this server returns no log probabilities"),
    "top_logprobs": (lambda v: not v, "null or 0", "this server returns no log probabilities"),
    "best_of": (lambda v: v is None or v == 1, "null or 1", "use 'n' for several choices"),
    "suffix": (lambda v: v is None, "null", "this server does not insert text"),
}


def check_neutral_fields(req: BaseModel) -> None:
    """Refuse an OpenAI field whose value the engine cannot honour (accepted only at its neutral value, the
    one OpenAI clients send by default, so that they work unchanged).

    Raises:
        APIError: 400 naming the field, its value and what is accepted (``param`` is the field).
    """
    for field, (neutral, accepted, why) in _NEUTRAL.items():
        if field in type(req).model_fields:
            value = getattr(req, field)
            if not neutral(value):
                raise APIError(400, f"'{field}' must be {accepted}: {why}; got {_short(value)}", param=field,
                               code="unsupported_value")


ROUTES = (
    "routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /metrics, GET /healthz"
)


def field_hints(cap: Optional[int]) -> dict[str, str]:
    tokens = f"an integer from 1 to {cap} (max_tokens_cap of this deployment)" if cap else "an integer of at least 1"
    return {
        "model": "a string naming the served model",
        "prompt": "a non-empty string, or a list holding exactly one string",
        "messages": "a non-empty list of {'role': 'system'|'developer'|'user'|'assistant', 'content': a string "
                    "or a list of {'type': 'text', 'text': string}}",
        "max_tokens": tokens,
        "max_completion_tokens": tokens,
        "temperature": "a number from 0 to 2 (0 = greedy)",
        "top_p": "a number greater than 0 and at most 1",
        "seed": f"an integer from 0 to {MAX_SEED}",
        "stop": f"a non-empty string or a list of at most {MAX_STOP_STRINGS} non-empty strings, "
                f"each at most {MAX_STOP_CHARS} characters",
        "n": f"an integer from 1 to {MAX_N} (1 when stream is true)",
        "stream": "true or false",
        "stream_options": "an object {'include_usage': true|false}, only with stream: true",
        "echo": "false (echo is not supported)",
        "user": "a string",
        "frequency_penalty": "0 (the only value supported)",
        "presence_penalty": "0 (the only value supported)",
        "logit_bias": "null or {} (the only values supported)",
        "logprobs": "null (the only value supported; false in a chat request)",
        "top_logprobs": "null or 0 (the only values supported)",
        "best_of": "null or 1",
        "suffix": "null (the only value supported)",
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


def error_body(exc: ZeroplaneError) -> dict:
    """The OpenAI error shape of ``exc``: ``{"error": {"message", "type", "param", "code"}}``."""
    status = exc.http_status
    kind = getattr(exc, "type", None) or ("invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": exc.message, "type": kind, "param": getattr(exc, "param", None),
                      "code": getattr(exc, "code", None)}}


def body_too_large(size: str) -> APIError:
    """The 413 for a request body of ``size`` bytes (``"2000000"``, ``"over 1048576"``)."""
    return APIError(413, f"request body is {size} bytes; the limit is {MAX_BODY_BYTES} bytes")


def request_timeout(limit_s: float) -> APIError:
    """The 504 for a request that ran past ``request_timeout_s`` (``limit_s`` seconds)."""
    return APIError(
        504, f"the request was stopped after this deployment's limit of {limit_s:g} s (request_timeout_s); "
             "ask for fewer tokens or retry later", code="request_timeout",
    )


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validation_message(
    errors: list[dict], body: Any, cap: Optional[int], fields: Optional[list[str]] = None
) -> tuple[str, Optional[str]]:
    """One line for the first pydantic error: ``(message, offending field)``.

    Args:
        errors: pydantic's ``errors()``; only the first is reported.
        body: the decoded request body (for the offending value).
        cap: the deployment's ``max_tokens_cap`` (named in the hint), or None.
        fields: the request schema's field names (listed for an unknown field); default all known.
    """
    hints = field_hints(cap)
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


def default_chat_prompt(messages: list[dict]) -> str:
    """The default chat template: ``"<role>: <content>\\n"`` per message, then ``"assistant:"``.

    Used when the model version's tokenizer has no ``chat_template``.

    Args:
        messages: ``[{"role": ..., "content": ...}, ...]``.

    Returns:
        The prompt text, e.g. ``"system: be brief\\nuser: hi\\nassistant:"``.
    """
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def sse(obj: Any) -> str:
    """One server-sent event carrying ``obj`` as compact JSON: ``"data: {...}\\n\\n"``."""
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


@dataclass
class Job:
    """One choice for an engine to generate.

    Attributes:
        prompt_ids: prompt token ids (1-D, at least one).
        max_tokens: most NEW tokens (>= 1).
        temperature: 0 (below ``GREEDY_TEMPERATURE_EPS``) is greedy; else the sampling temperature.
        top_p: nucleus mass, 0 < top_p <= 1.
        seed: sampling seed (0..``MAX_SEED``) or None for a random one.
        deadline: ``time.monotonic()`` after which generation stops (``request_timeout_s``).
    """

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: Optional[int]
    deadline: float

    @property
    def greedy(self) -> bool:
        """Whether this job decodes greedily (temperature below ``GREEDY_TEMPERATURE_EPS``)."""
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def expired(self) -> bool:
        """Whether ``time.monotonic()`` has reached the deadline."""
        return time.monotonic() >= self.deadline
