"""A replica's request path without Ray, Serve or a model: :class:`ModelCore` with a scripted engine and a
real byte-level tokenizer (every byte one token, so multi-byte characters are split across tokens).

Covers: streamed text joined equals the non-streamed text for every stop set (multi-byte stops, a stop
starting inside a split character); a chat prompt tokenized once (one BOS; usage.prompt_tokens equals
``apply_chat_template(tokenize=True)``); OpenAI's neutral field values accepted and others refused with the
field named; abandoned requests counted as 499; the protocol module importable without torch and Ray.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest
from tokenizers import ByteLevelBPETokenizer, processors
from transformers import PreTrainedTokenizerFast

from zeroplane.runtime.serve.protocol import APIError
from zeroplane.runtime.serve.server import ModelCore

#: What the scripted engine generates: ASCII, 2-, 3- and 4-byte characters (one token per byte).
SCRIPT_TEXT = "ab xé€y 日本 done, ok 🙂!"
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def byte_tokenizer(bos: bool = False, chat_template: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE with no merges (vocabulary: the 256 bytes, eos and ``<s>``); with ``bos`` it adds
    ``<s>`` in front of every text, as Llama-style tokenizers do."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["x"], vocab_size=258, min_frequency=1, special_tokens=["<|endoftext|>", "<s>"])
    inner = bpe._tokenizer
    if bos:
        inner.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", inner.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, eos_token="<|endoftext|>", bos_token="<s>")
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


class ScriptedEngine:
    """An engine that generates ``script`` (cut at ``max_tokens``): one token per step when streaming, all at
    once otherwise; with ``hang`` it never yields. Records the jobs it got and how many it saw closed."""

    name = "scripted"
    context = 512

    def __init__(self, script: list[int], hang: bool = False) -> None:
        self.script, self.hang = script, hang
        self.jobs: list = []
        self.closed = 0

    def health(self):
        return None

    async def generate(self, job, stream):
        self.jobs.append(job)
        ids = self.script[: job.max_tokens]
        try:
            if self.hang:
                await asyncio.Event().wait()
            if stream:
                for token in ids:
                    await asyncio.sleep(0)
                    yield [token]
            else:
                yield ids
        finally:
            self.closed += 1


class Recorder:
    """Metrics stand-in: the ``(route, status, tokens)`` of every observed request."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, int]] = []

    def observe(self, route, status, latency_s, tokens=0):
        self.seen.append((route, status, tokens))


def core(tokenizer=None, engine=None, metrics=None) -> ModelCore:
    tokenizer = tokenizer or byte_tokenizer()
    engine = engine or ScriptedEngine(tokenizer(SCRIPT_TEXT)["input_ids"])
    return ModelCore({"model_name": "m", "version": "v1", "model_uri": "/unused", "auth": False,
                      "max_tokens_cap": 256}, tokenizer, engine, metrics)


def answer(c: ModelCore, body: dict, kind: str = "completions") -> dict:
    return asyncio.run(c.answer(kind, body, time.monotonic()))


def streamed(c: ModelCore, body: dict, kind: str = "completions") -> tuple[str, list[dict]]:
    """The joined text of a streamed answer and its parsed events."""

    async def collect():
        return [item async for item in c.stream(kind, {**body, "stream": True}, time.monotonic())]

    items = asyncio.run(collect())
    assert items[0] == {"status": 200}
    events = [json.loads(i[len("data: "):]) for i in items[1:] if i.startswith("data: {")]
    assert items[-1] == "data: [DONE]\n\n"
    key = "delta" if kind == "chat" else None
    parts = []
    for e in events:
        for ch in e["choices"]:
            parts.append(ch["delta"].get("content", "") if key else ch["text"])
    return "".join(parts), events


def expected_text(tokenizer, ids: list[int], stops: list[str]) -> str:
    """What a server that checks the stop strings after every token answers: the text at the first token
    whose text contains a stop, cut before the earliest one present."""
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k], skip_special_tokens=True)
        found = [text.find(s) for s in stops if s in text]
        if found:
            return text[: min(found)]
    return tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("stops", [
    [], ["é"], ["xé"], ["€y"], ["本 d", "y 日"], ["zzz"], ["e"], ["日本", "本"], ["🙂"], ["k 🙂!"],
    ["é€", "ab x"], ["\ufffd"],
])
@pytest.mark.parametrize("max_tokens", [64, 7])
def test_streamed_text_joined_equals_the_plain_text(stops, max_tokens):
    tok = byte_tokenizer()
    c = core(tok)
    body = {"prompt": "hi", "max_tokens": max_tokens, "temperature": 0, "stop": stops}
    plain = answer(c, body)["choices"][0]
    joined, events = streamed(c, body)
    script = tok(SCRIPT_TEXT)["input_ids"][:max_tokens]
    assert joined == plain["text"] == expected_text(tok, script, stops)
    assert events[-1]["choices"][0]["finish_reason"] == plain["finish_reason"]
    assert not any("\ufffd" in ch["text"] for e in events[:-1] for ch in e["choices"]) or max_tokens == 7


def test_a_stop_starting_before_a_split_character_never_reaches_the_stream():
    tok = byte_tokenizer()
    joined, events = streamed(core(tok), {"prompt": "hi", "max_tokens": 64, "stop": ["xé"]})
    assert joined == "ab " and events[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("x" not in ch["text"] for e in events for ch in e["choices"])


def test_chat_prompt_is_tokenized_once_with_one_bos():
    tok = byte_tokenizer(bos=True, chat_template=True)
    engine = ScriptedEngine(tok(SCRIPT_TEXT, add_special_tokens=False)["input_ids"])
    c = core(tok, engine)
    messages = [{"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]}]
    out = answer(c, {"messages": messages, "max_tokens": 4}, kind="chat")
    template_messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi\nthere"}]
    reference = tok.apply_chat_template(template_messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    prompt_ids = engine.jobs[0].prompt_ids
    assert prompt_ids == list(reference)
    assert prompt_ids.count(tok.bos_token_id) == 1 and prompt_ids[0] == tok.bos_token_id
    assert out["usage"]["prompt_tokens"] == len(reference)


NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}, "logprobs": None, "user": "u"}


@pytest.mark.parametrize("kind,extra", [
    ("completions", {**NEUTRAL, "best_of": 1, "suffix": None}),
    ("chat", {**NEUTRAL, "logprobs": False, "top_logprobs": None}),
    ("chat", {"logprobs": None, "top_logprobs": 0}),
])
def test_neutral_openai_fields_are_accepted(kind, extra):
    body = {"max_tokens": 3, **extra}
    body.update({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]} if kind == "chat"
                else {"prompt": "hi"})
    assert answer(core(), body, kind)["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("kind,field,value", [
    ("completions", "frequency_penalty", 0.5), ("chat", "presence_penalty", -1), ("completions", "logit_bias", {"5": 1}),
    ("completions", "logprobs", 2), ("chat", "logprobs", True), ("chat", "top_logprobs", 3),
    ("completions", "best_of", 3), ("completions", "suffix", "tail"),
])
def test_values_the_engine_cannot_honour_get_a_400_naming_the_field(kind, field, value):
    body = {field: value}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if kind == "chat" else {"prompt": "hi"})
    with pytest.raises(APIError) as err:
        answer(core(), body, kind)
    assert err.value.http_status == 400 and err.value.param == field
    assert f"'{field}'" in err.value.message


def test_a_non_text_content_part_gets_a_400_naming_messages():
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    with pytest.raises(APIError) as err:
        answer(core(), body, "chat")
    assert err.value.http_status == 400 and err.value.param == "messages"
    assert "'type': 'text'" in err.value.message


def test_abandoned_requests_count_as_499_streaming_or_not():
    rec = Recorder()
    engine = ScriptedEngine([65] * 8, hang=True)
    c = core(engine=engine, metrics=rec)

    async def abandon_plain():
        task = asyncio.ensure_future(c.answer("completions", {"prompt": "hi"}, time.monotonic()))
        while not engine.jobs:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    async def abandon_stream():
        events = c.stream("completions", {"prompt": "hi", "stream": True}, time.monotonic())
        assert await events.__anext__() == {"status": 200}
        pending = asyncio.ensure_future(events.__anext__())
        while len(engine.jobs) < 2:
            await asyncio.sleep(0)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        await events.aclose()

    asyncio.run(abandon_plain())
    asyncio.run(abandon_stream())
    assert [status for _, status, _ in rec.seen] == [499, 499]
    assert engine.closed == 2  # both generations were closed (their engine slots freed)


def test_n_choices_run_concurrently_with_their_own_seeds():
    engine = ScriptedEngine(byte_tokenizer()("ABC")["input_ids"])
    out = answer(core(engine=engine), {"prompt": "hi", "n": 3, "seed": 5, "temperature": 0.7, "max_tokens": 3})
    assert [j.seed for j in engine.jobs] == [5, 6, 7]
    assert [ch["text"] for ch in out["choices"]] == ["ABC"] * 3 and out["usage"]["completion_tokens"] == 9


def test_protocol_and_request_path_import_without_torch_or_ray():
    code = ("import sys, zeroplane.runtime.serve.protocol, zeroplane.runtime.serve.server, "
            "zeroplane.runtime.serve.text, zeroplane.runtime.serve.auth, zeroplane.runtime.serve.canary; "
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_stream_closed_at_a_yield_closes_its_engine_job_at_once():
    engine = ScriptedEngine(byte_tokenizer()(SCRIPT_TEXT)["input_ids"])
    rec = Recorder()
    c = core(engine=engine, metrics=rec)

    async def run():
        events = c.stream("completions", {"prompt": "hi", "max_tokens": 64, "stream": True}, time.monotonic())
        assert await events.__anext__() == {"status": 200}
        assert (await events.__anext__()).startswith("data: ")  # a text chunk: both generators sit at a yield
        await events.aclose()  # what the HTTP layer does when the client hangs up
        return engine.closed

    assert asyncio.run(run()) == 1 and rec.seen[-1][1] == 499


def test_a_canary_at_0_percent_is_only_a_rollouts_drain_step():
    """Weight 0 (and then even the stable version as canary) is accepted, for the drain step of a rollout that
    removes the canary; a canary taking traffic must still be another version."""
    from zeroplane.runtime.serve.protocol import parse_args

    base = {"model_name": "m", "version": "v2", "model_uri": "/m2", "storage_path": "/s"}
    drain = parse_args({**base, "canary": {"version": "v2", "model_uri": "/m2", "weight_percent": 0}})
    assert drain.canary.weight_percent == 0
    with pytest.raises(ValueError, match="canary must be another version"):
        parse_args({**base, "canary": {"version": "v2", "model_uri": "/m2", "weight_percent": 10}})
    with pytest.raises(ValueError, match="weight_percent"):
        parse_args({**base, "canary": {"version": "v1", "model_uri": "/m1", "weight_percent": -1}})


def test_an_ingress_with_its_canary_at_0_percent_routes_nothing_to_it():
    tokenizer = byte_tokenizer()
    args = {"model_name": "m", "version": "v1", "model_uri": "/unused", "auth": False, "max_tokens_cap": 256}
    engine = ScriptedEngine(tokenizer(SCRIPT_TEXT)["input_ids"])
    handle = object()  # the canary deployment's handle: never used at 0 %
    split = ModelCore({**args, "canary": {"version": "v2", "model_uri": "/m2", "weight_percent": 30}}, tokenizer, engine, None, handle)
    assert split._split is not None and split._split.weight_percent == 30
    drain = ModelCore({**args, "canary": {"version": "v2", "model_uri": "/m2", "weight_percent": 0}}, tokenizer, engine, None, handle)
    assert drain._split is None
