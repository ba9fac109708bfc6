"""One replica's request handling: validate, tokenize, generate through the engine, answer (JSON or SSE).

:class:`ModelCore` has no HTTP routes (``app.py`` adds them) and takes its engine and tokenizer from
:meth:`ModelCore.load` — or, in unit tests, from the caller (a scripted engine), so the whole request path
runs without Ray, Serve or a model.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Optional, Union

from pydantic import ValidationError

from zeroplane.errors import ZeroplaneError
from zeroplane.registry import check_version_folder
from zeroplane.runtime.serve import auth
from zeroplane.runtime.serve.canary import CanarySplit
from zeroplane.runtime.serve.protocol import (
    DEFAULT_CHAT_STOPS, DEFAULT_MAX_TOKENS, MAX_BODY_BYTES, MAX_SEED, APIError, ChatCompletionRequest,
    CompletionRequest, Job, ServeAppArgs, body_too_large, check_neutral_fields, default_chat_prompt, error_body, field_hints,
    parse_args, request_timeout, sse, validation_message,
)
from zeroplane.runtime.serve.text import TextAssembler
from zeroplane.storage import Storage

logger = logging.getLogger("ray.serve")


@dataclass
class Prepared:
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

    def job(self, choice: int) -> Job:
        """The engine job of choice ``choice`` (0-based): choice ``i`` of a seeded request uses ``seed + i``."""
        seed = None if self.seed is None else (self.seed + choice) % (MAX_SEED + 1)
        return Job(self.prompt_ids, self.max_tokens, self.temperature, self.top_p, seed, self.deadline)


def fetch_model(uri: str) -> tuple[str, Optional[str]]:
    """A local folder holding the model of ``uri`` (a local path, ``file://`` or ``s3://`` URI).

    Returns:
        ``(folder, temporary folder to delete when done, or None)``.

    Raises:
        FileNotFoundError: the folder has no ``config.json``.
        OSError: an ``s3://`` model could not be downloaded.
        ZeroplaneError: a file differs from the version's marker (:func:`zeroplane.registry.check_version_folder`).
    """
    tmp = None
    if uri.startswith("s3://"):
        storage = Storage.from_uri(uri)
        tmp = tempfile.mkdtemp(prefix="zeroplane-model-")
        storage.download_dir(storage.path(), tmp)
        local = Path(tmp)
    else:
        local = Path(os.path.expanduser(uri.removeprefix("file://")))
    if not (local / "config.json").is_file():
        raise FileNotFoundError(f"model_uri {uri!r} is not a Hugging Face model folder (no config.json in {local})")
    try:  # a registered version is loaded only if every file matches the size and SHA-256 its marker recorded
        check_version_folder(local, uri)
    except ZeroplaneError:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(local), tmp


async def read_json(request: Any) -> Any:
    """The JSON body of a Starlette request, read while counting its bytes.

    Raises:
        APIError: 413 over ``MAX_BODY_BYTES`` (also for a chunked body, as it streams in), 400 for an empty
            body, invalid JSON, unacceptable numbers, deep nesting or unpaired surrogate escapes.
    """
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise body_too_large(length)
    # Count while reading and stop past the limit: a chunked body has no Content-Length to check first,
    # and reading it whole would let one request make the replica buffer any amount of data.
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise body_too_large(f"over {MAX_BODY_BYTES}")
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


class ModelCore:
    """One replica serving one model version: validation, tokenization, generation, metrics.

    Args:
        args: the validated :class:`ServeAppArgs` (or its dict).
        tokenizer: a Hugging Face tokenizer (used on the event loop thread only: fast tokenizers are not safe
            under concurrent use).
        engine: an engine of :mod:`zeroplane.runtime.serve.engine` (``generate(job, stream)``, ``context``,
            ``health()``), or a scripted one in tests.
        metrics: a :class:`zeroplane.runtime.serve.metrics.Metrics`, or None to record nothing.
        canary: deployment handle of the canary version (only on the ingress of a traffic split), else None.
    """

    def __init__(self, args: Union[dict, ServeAppArgs], tokenizer: Any, engine: Any, metrics: Any = None,
                 canary: Any = None) -> None:
        self._args = parse_args(args)
        self._name = self._args.model_name
        self._served_id = f"{self._args.model_name}:{self._args.version}"
        self._created = int(time.time())
        self._tokenizer = tokenizer
        self._chat_template = bool(getattr(tokenizer, "chat_template", None))
        self._eos_id: Optional[int] = tokenizer.eos_token_id
        self._engine = engine
        self._context: Optional[int] = engine.context
        self._metrics = metrics
        self._canary = canary
        split = self._args.canary
        self._split = (CanarySplit(self._served_id, f"{self._name}:{split.version}", split.weight_percent)
                       if split is not None and canary is not None and split.weight_percent > 0 else None)
        self._canary_id = self._split.canary_id if self._split else None
        self._keys = (
            auth.KeyCache(Storage.from_uri(self._args.storage_path), self._args.key_cache_ttl_s,
                          self._args.key_max_stale_s)
            if self._args.auth else None
        )
        self._tmpdir: Optional[str] = None

    @classmethod
    def load(cls, args: Union[dict, ServeAppArgs], canary: Any = None) -> "ModelCore":
        """Fetch the version's folder, load tokenizer and model, build and warm up the engine ``serve.engine``.

        Raises:
            FileNotFoundError: ``model_uri`` is a local path that does not exist or has no config.json.
            OSError: an ``s3://`` model could not be downloaded.
        """
        from transformers import AutoTokenizer

        from zeroplane.runtime.serve.engine import build_engine, load_model
        from zeroplane.runtime.serve.metrics import Metrics

        cfg = parse_args(args)
        local, tmp = fetch_model(cfg.model_uri)
        tokenizer = AutoTokenizer.from_pretrained(local)
        model, device = load_model(local, tokenizer)
        engine = build_engine(cfg.engine, model, device, tokenizer, cfg.max_batch_size, cfg.batch_wait_timeout_s)
        started = time.monotonic()
        engine.warmup()
        core = cls(cfg, tokenizer, engine, Metrics(cfg.model_name, cfg.version), canary)
        core._tmpdir = tmp
        logger.info(
            "zeroplane ModelServer %s loaded from %s (engine %s warmed up in %.1f s, context %s, device %s, auth %s, "
            "canary %s)", core._served_id, cfg.model_uri, engine.name, time.monotonic() - started, core._context,
            device, cfg.auth, core._canary_id,
        )
        return core

    def __del__(self) -> None:
        tmp = getattr(self, "_tmpdir", None)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    # ---------------------------------------------------------------------------------- health

    def health(self) -> Optional[str]:
        """None, or why this replica should be replaced (a wedged engine, a hung key store read)."""
        reason = self._engine.health()
        if reason is None and self._keys is not None:
            reason = self._keys.health()
        return reason

    # ---------------------------------------------------------------------------------- entry points

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
            return 200, await self.answer(kind, body, time.monotonic())
        except ZeroplaneError as e:
            return e.http_status, error_body(e)

    async def stream_api(self, kind: str, body: Any) -> AsyncIterator[Union[dict, str]]:
        """Streaming twin of :meth:`handle_api`: first ``{"status", "error"?}``, then SSE text chunks."""
        async for item in self.stream(kind, body, time.monotonic()):
            yield item

    def _observe(self, kind: str, status: int, started: float, tokens: int = 0) -> None:
        if self._metrics is not None:
            self._metrics.observe(kind, status, time.monotonic() - started, tokens)

    # ---------------------------------------------------------------------------------- generation

    async def _choice(self, p: Prepared, choice: int, assembler: TextAssembler) -> AsyncIterator[str]:
        """Text deltas of one choice, every generated token through ``assembler``; stops the engine's job as
        soon as the assembler is done (eos, stop string, max_tokens), the deadline passes or the consumer goes
        away (closing this generator closes the engine's).

        Raises:
            APIError: 504 past ``request_timeout_s``.
        """
        tokens = self._engine.generate(p.job(choice), p.stream)
        try:
            while not assembler.done:
                remaining = p.deadline - time.monotonic()
                if remaining <= 0:
                    raise request_timeout(self._args.request_timeout_s)
                try:
                    ids = await asyncio.wait_for(tokens.__anext__(), remaining)
                except StopAsyncIteration:
                    break
                except (asyncio.TimeoutError, TimeoutError):
                    raise request_timeout(self._args.request_timeout_s) from None
                delta = assembler.feed(ids)
                if delta:
                    yield delta
            rest = assembler.finish()
            if rest:
                yield rest
        finally:
            await tokens.aclose()

    def _assembler(self, p: Prepared) -> TextAssembler:
        return TextAssembler(lambda ids: self._tokenizer.decode(ids, skip_special_tokens=True), self._eos_id,
                             p.stops, p.max_tokens)

    async def answer(self, kind: str, body: Any, started: float) -> dict:
        """The JSON answer of a non-streaming request (metrics recorded). Raises :class:`APIError`."""
        assemblers: list[TextAssembler] = []
        try:
            p = self.prepare(kind, body, started)
            assemblers = [self._assembler(p) for _ in range(p.n)]

            async def one(i: int) -> str:
                return "".join([delta async for delta in self._choice(p, i, assemblers[i])])

            tasks = [asyncio.ensure_future(one(i)) for i in range(p.n)]
            try:
                texts = await asyncio.gather(*tasks)
            finally:  # one choice failing (or the caller going away) ends the others: their slots are freed
                for task in tasks:
                    task.cancel()
        except ZeroplaneError as e:
            self._observe(kind, e.http_status, started)
            raise
        except asyncio.CancelledError:  # the client went away (or the caller gave up): counted as 499
            self._observe(kind, 499, started, sum(a.n_tokens for a in assemblers))
            raise
        choices, completion_tokens = [], 0
        for i, (text, a) in enumerate(zip(texts, assemblers)):
            completion_tokens += a.n_tokens
            if kind == "chat":
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "finish_reason": a.finish_reason, "logprobs": None})
            else:
                choices.append({"index": i, "text": text, "finish_reason": a.finish_reason, "logprobs": None})
        self._observe(kind, 200, started, completion_tokens)
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

    async def stream(self, kind: str, body: Any, started: float) -> AsyncIterator[Union[dict, str]]:
        """``{"status": 200}`` then the SSE chunks of a streamed answer; or ``{"status": 4xx, "error"}``."""
        try:
            p = self.prepare(kind, body, started)
        except ZeroplaneError as e:
            self._observe(kind, e.http_status, started)
            yield {"status": e.http_status, **error_body(e)}
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
                delta: dict = {"role": "assistant", "content": ""} if first else (
                    {} if text is None else {"content": text})
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            return sse({**head, "choices": [choice]})

        assembler = self._assembler(p)
        deltas = self._choice(p, 0, assembler)
        status = 499  # until the stream completes: the client went away
        try:
            if chat:
                yield chunk(None, None, first=True)
            async for delta in deltas:
                yield chunk(delta, None)
            yield chunk(None if chat else "", assembler.finish_reason)
            if p.include_usage:
                usage = {"prompt_tokens": len(p.prompt_ids), "completion_tokens": assembler.n_tokens,
                         "total_tokens": len(p.prompt_ids) + assembler.n_tokens}
                yield sse({**head, "choices": [], "usage": usage})
            yield "data: [DONE]\n\n"
            status = 200
        except ZeroplaneError as e:  # past request_timeout_s: the 200 is sent, so an error event ends the stream
            status = e.http_status
            yield sse(error_body(e))
        finally:
            # A client that hangs up closes this generator at a yield, where the choice's generator is suspended
            # too: close it now (its engine job is cancelled and the slot freed) rather than when it is collected.
            await deltas.aclose()
            self._observe(kind, status, started, assembler.n_tokens)

    # ---------------------------------------------------------------------------------- request parsing

    async def _read_json(self, request: Any) -> Any:
        return await read_json(request)

    def validate(self, body: Any, kind: str) -> Union[CompletionRequest, ChatCompletionRequest]:
        cap = self._args.max_tokens_cap
        schema = ChatCompletionRequest if kind == "chat" else CompletionRequest
        if not isinstance(body, dict):
            raise APIError(400, f"request body must be a JSON object, got {type(body).__name__}")
        try:
            req = schema.model_validate(body)
        except ValidationError as e:
            message, param = validation_message(e.errors(), body, cap, list(schema.model_fields))
            raise APIError(400, message, param=param) from None
        hints = field_hints(cap)
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
        check_neutral_fields(req)
        if req.stream and req.n != 1:
            raise APIError(400, f"'n' must be 1 when 'stream' is true; got {req.n}", param="n")
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")
        return req

    def prepare(self, kind: str, body: Any, started: float) -> Prepared:
        """Validate ``body`` and tokenize its prompt; ``started`` is the request's ``time.monotonic()`` arrival
        (its deadline is ``request_timeout_s`` later). Raises :class:`APIError` (4xx) for any mistake."""
        req = self.validate(body, kind)
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if isinstance(req, ChatCompletionRequest):
            messages = [m.as_template_message() for m in req.messages]
            if self._chat_template:
                # Tokenized by the template call itself, once: rendering to text and tokenizing that again would
                # add the tokenizer's BOS in front of the one the template writes.
                try:
                    encoded = self._tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
                except Exception as e:  # noqa: BLE001 - a template may reject a message order
                    raise APIError(400, f"'messages' do not fit this model's chat template: {e}",
                                   param="messages") from None
                prompt_ids = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
            else:
                prompt_ids = list(self._tokenizer(default_chat_prompt(messages))["input_ids"])
                stops += list(DEFAULT_CHAT_STOPS)
            max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            param = "messages"
        else:
            prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
            prompt_ids = list(self._tokenizer(prompt)["input_ids"])
            max_tokens = req.max_tokens
            param = "prompt"
        if max_tokens is None:
            max_tokens = min(DEFAULT_MAX_TOKENS, self._args.max_tokens_cap)

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
        return Prepared(kind, prompt_ids, max_tokens, stops, req.temperature, req.top_p, req.seed, req.n,
                         req.stream, include_usage, started + self._args.request_timeout_s)
