"""The Serve application over real HTTP: a tiny GPT-2 built from a config, served by a local Ray.

One module-scoped Ray + Serve instance; every test talks to it through the Serve HTTP proxy.
"""

from __future__ import annotations

import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch

from zeroplane.runtime.serve.app import MAX_BODY_BYTES, MAX_STOP_CHARS

pytestmark = pytest.mark.integration

MAX_TOKENS_CAP = 48
N_POSITIONS = 64
CORPUS = [
    "the quick brown fox jumps over the lazy dog.",
    "hello world, this is a tiny corpus for a tiny tokenizer.",
    "ray serve answers requests in batches on every replica.",
    "deepspeed zero shards optimizer states across data parallel workers.",
] * 25
#: key_max_stale_s of the guard app: its cached keys are trusted this long (seconds) while the store is unreadable.
GUARD_MAX_STALE_S = 1.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 2-layer GPT-2 and a BPE tokenizer (eos, no pad) trained here, saved as a Hugging Face folder."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=320, min_frequency=1, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    assert tokenizer.pad_token is None
    eos = tokenizer.eos_token_id

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer), n_positions=N_POSITIONS,
        bos_token_id=eos, eos_token_id=eos,
    )
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        # Tied lm_head: a zero eos embedding gives eos a logit of exactly 0, below the random
        # maximum, so greedy decoding never ends early and lengths are predictable.
        model.transformer.wte.weight[eos].zero_()

    path = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return SimpleNamespace(path=str(path), model=model, tokenizer=tokenizer, eos=eos)


def _reference_greedy(tiny, prompt: str, max_new_tokens: int) -> tuple[list[int], str]:
    ids = tiny.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = tiny.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=tiny.eos, eos_token_id=tiny.eos,
        )
    new = out[0, ids.shape[1]:].tolist()
    return new, tiny.tokenizer.decode(new, skip_special_tokens=True)


@pytest.fixture(scope="module")
def server(ray_local, tiny_model, tmp_path_factory):
    """Serve on a free port of the session's local Ray, the app at /tiny."""
    from ray import serve

    from zeroplane import serve_keys
    from zeroplane.runtime.serve.app import build_app

    storage = str(tmp_path_factory.mktemp("storage"))
    key, _ = serve_keys.create_key(storage, name="main")
    key_to_revoke, record_to_revoke = serve_keys.create_key(storage, name="to-revoke")

    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(
            build_app({
                "model_name": "tiny", "version": "v1", "model_uri": tiny_model.path,
                "storage_path": storage, "max_tokens_cap": MAX_TOKENS_CAP,
                "max_batch_size": 8, "batch_wait_timeout_s": 0.05,
            }),
            name="tiny",
            route_prefix="/tiny",
        )
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/tiny", timeout=60) as client:
            yield SimpleNamespace(
                client=client, base_url=f"http://127.0.0.1:{port}/tiny", storage=storage, key=key,
                key_to_revoke=key_to_revoke, id_to_revoke=record_to_revoke["id"],
            )
    finally:
        serve.shutdown()


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _complete(server, body, key=None, **kwargs) -> httpx.Response:
    return server.client.post("/v1/completions", json=body, headers=_auth(key or server.key), **kwargs)


def _assert_error(resp: httpx.Response, status: int, *needles: str) -> None:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error"
    for needle in needles:
        assert needle in err["message"], err["message"]


def test_healthz_needs_no_key(server):
    resp = server.client.get("/healthz")
    assert resp.status_code == 200
    assert resp.json()["status"] == "ok"


def test_models_lists_the_model(server):
    resp = server.client.get("/v1/models", headers=_auth(server.key))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["tiny:v1"]
    _assert_error(server.client.get("/v1/models"), 401)


def test_greedy_completion_matches_in_process_generate(server, tiny_model):
    prompt, max_tokens = "hello world, this is", 40
    ref_ids, ref_text = _reference_greedy(tiny_model, prompt, max_tokens)
    assert len(ref_ids) == max_tokens and tiny_model.eos not in ref_ids

    resp = _complete(server, {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    n_prompt = len(tiny_model.tokenizer(prompt)["input_ids"])
    assert body["object"] == "text_completion" and body["model"] == "tiny:v1" and body["id"]
    assert body["choices"][0]["text"] == ref_text
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {
        "prompt_tokens": n_prompt, "completion_tokens": max_tokens, "total_tokens": n_prompt + max_tokens,
    }

    # model "name:version" and a one-string list prompt are accepted too
    resp = _complete(server, {"model": "tiny:v1", "prompt": [prompt], "max_tokens": 5, "temperature": 0})
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["text"] == _reference_greedy(tiny_model, prompt, 5)[1]


def test_default_max_tokens_is_16(server):
    resp = _complete(server, {"prompt": "ray serve", "temperature": 0})
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 16


def test_stop_string_cuts_the_text(server, tiny_model):
    prompt = "the quick brown"
    _, ref_text = _reference_greedy(tiny_model, prompt, 30)
    stop = ref_text[len(ref_text) // 2: len(ref_text) // 2 + 2]
    assert stop
    resp = _complete(server, {"prompt": prompt, "max_tokens": 30, "temperature": 0, "stop": [stop, "\u2603"]})
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    assert choice["text"] == ref_text[: ref_text.find(stop)]
    assert choice["finish_reason"] == "stop"
    assert resp.json()["usage"]["completion_tokens"] <= 30


def test_auth_rejects_missing_wrong_and_malformed_keys(server):
    body = {"prompt": "hello", "max_tokens": 2}
    _assert_error(server.client.post("/v1/completions", json=body), 401, "API key")
    _assert_error(_complete(server, body, key="zp-not-a-real-key"), 401, "invalid")
    resp = server.client.post("/v1/completions", json=body, headers={"Authorization": f"Basic {server.key}"})
    _assert_error(resp, 401, "Bearer")
    # checked before the body: a broken body without a key is still a 401
    _assert_error(server.client.post("/v1/completions", content=b"{nope"), 401)


@pytest.mark.parametrize(
    "kwargs, status, needles",
    [
        ({"content": b""}, 400, ["empty"]),
        ({"content": b"{not json"}, 400, ["JSON"]),
        ({"json": ["hello"]}, 400, ["JSON object"]),
        ({"json": {"max_tokens": 4}}, 400, ["prompt", "required"]),
        ({"json": {"prompt": ""}}, 400, ["prompt"]),
        ({"json": {"prompt": 5}}, 400, ["prompt"]),
        ({"json": {"prompt": ["a", "b"]}}, 400, ["prompt"]),
        ({"json": {"prompt": "hi", "max_tokens": MAX_TOKENS_CAP + 1}}, 400, ["max_tokens", str(MAX_TOKENS_CAP)]),
        ({"json": {"prompt": "hi", "max_tokens": "abc"}}, 400, ["max_tokens", "abc"]),
        ({"json": {"prompt": "hi", "max_tokens": 0}}, 400, ["max_tokens"]),
        ({"content": b'{"prompt": "\\ud800 abc", "max_tokens": 2}'}, 400, ["surrogate"]),
        ({"content": b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}"}, 400, ["JSON"]),
        ({"content": b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"}, 400, ["JSON"]),
        ({"json": {"prompt": "hi", "temperature": -1}}, 400, ["temperature"]),
        ({"json": {"prompt": "hi", "top_p": 0}}, 400, ["top_p"]),
        ({"json": {"prompt": "hi", "stop": ""}}, 400, ["stop"]),
        ({"json": {"prompt": "hi", "stop": ["ok", "x" * (MAX_STOP_CHARS + 1)]}}, 400, ["stop", str(MAX_STOP_CHARS)]),
        ({"json": {"prompt": "hi", "stream": "yes"}}, 400, ["stream"]),
        ({"json": {"prompt": "hi", "stream": True, "n": 2}}, 400, ["'n'", "stream"]),
        ({"json": {"prompt": "hi", "n": 5}}, 400, ["'n'", "4"]),
        ({"json": {"prompt": "hi", "stream_options": {"include_usage": True}}}, 400, ["stream_options"]),
        ({"json": {"prompt": "hi", "max_token": 3}}, 400, ["max_token"]),
        ({"json": {"prompt": "zebra " * 80, "max_tokens": 8}}, 400, ["prompt", str(N_POSITIONS)]),
        ({"json": {"prompt": "hi", "model": "other"}}, 404, ["other", "tiny"]),
    ],
    ids=[
        "empty-body", "not-json", "not-an-object", "prompt-missing", "prompt-empty", "prompt-int",
        "prompt-two", "max-tokens-over-cap", "max-tokens-string", "max-tokens-zero", "lone-surrogate",
        "huge-integer", "deep-nesting", "temperature-negative",
        "top-p-zero", "stop-empty", "stop-too-long", "stream-string", "stream-n-2", "n-5", "stream-options-without-stream",
        "unknown-field", "prompt-too-long", "unknown-model",
    ],
)
def test_client_mistakes_get_4xx_with_reason(server, kwargs, status, needles):
    headers = {**_auth(server.key), "Content-Type": "application/json"}
    resp = server.client.post("/v1/completions", headers=headers, **kwargs)
    _assert_error(resp, status, *needles)


def test_unknown_route_and_wrong_method_get_error_json(server):
    _assert_error(server.client.get("/v1/nope"), 404, "no route")
    _assert_error(server.client.get("/v1/completions", headers=_auth(server.key)), 405, "GET")


def test_concurrent_requests_get_their_own_lengths(server, tiny_model):
    prompts = ["hello world", "the quick brown fox", "ray", "deepspeed zero shards", "a", "tiny corpus"]
    jobs = [(p, 3 + 4 * i) for i, p in enumerate(prompts)]
    # Each fits the 64-token context alone, but not padded together: the server must split the batch.
    long_prompt = "hello world, this is a tiny corpus " * 3
    n_long = len(tiny_model.tokenizer(long_prompt)["input_ids"])
    assert 40 <= n_long <= N_POSITIONS - 4
    jobs += [(long_prompt, 4), ("ray", MAX_TOKENS_CAP)]

    def one(job):
        prompt, max_tokens = job
        return _complete(server, {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        responses = list(pool.map(one, jobs))
    for (prompt, max_tokens), resp in zip(jobs, responses):
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["completion_tokens"] == max_tokens
        assert resp.json()["usage"]["prompt_tokens"] == len(tiny_model.tokenizer(prompt)["input_ids"])


def test_seeded_sampling_is_reproducible(server):
    body = {"prompt": "hello", "max_tokens": 20, "temperature": 1.0, "top_p": 0.9, "seed": 1234}
    first, second = _complete(server, body), _complete(server, body)
    assert first.status_code == second.status_code == 200, first.text
    assert first.json()["choices"][0]["text"] == second.json()["choices"][0]["text"]
    other = _complete(server, {**body, "seed": 99})
    assert other.status_code == 200


def test_openai_client_works(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=server.key, max_retries=0)
    completion = client.completions.create(model="tiny", prompt="hello world", max_tokens=4, temperature=0)
    assert completion.usage.completion_tokens == 4
    assert completion.choices[0].finish_reason == "length"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hello", max_tokens=2)


def test_new_and_revoked_keys_take_effect_after_refresh(server):
    from zeroplane import serve_keys

    body = {"prompt": "hi", "max_tokens": 1, "temperature": 0}
    assert _complete(server, body, key=server.key_to_revoke).status_code == 200  # caches the key file
    new_key, _ = serve_keys.create_key(server.storage, name="late")
    serve_keys.revoke_key(server.storage, server.id_to_revoke)
    started = time.monotonic()
    revoked_status = new_status = None
    # The replica re-reads the key file every key_cache_ttl_s (5 s); 30 s is well under key_max_stale_s (60 s),
    # so passing here means the refresh did it, however slow the machine makes each request.
    while time.monotonic() - started < 30:
        revoked_status = _complete(server, body, key=server.key_to_revoke).status_code
        new_status = _complete(server, body, key=new_key).status_code
        if revoked_status == 401 and new_status == 200:
            break
        time.sleep(0.25)
    assert (revoked_status, new_status) == (401, 200)
    assert _complete(server, body).status_code == 200  # other keys unaffected
    _assert_error(_complete(server, body, key=server.key_to_revoke), 401, "revoked")


# ----------------------------------------------------------------------------------------- chat, streaming, n


def _sse_events(resp: httpx.Response) -> list:
    """The JSON payloads of an SSE response, plus the final "[DONE]" marker as a string."""
    events = []
    for line in resp.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: "):]
        events.append(data if data == "[DONE]" else __import__("json").loads(data))
    return events


def test_chat_completion_uses_the_default_template(server, tiny_model):
    from zeroplane.runtime.serve.app import DEFAULT_CHAT_STOPS, default_chat_prompt

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    prompt = default_chat_prompt(messages)
    assert prompt == "system: be brief\nuser: hello world\nassistant:"
    _, ref_text = _reference_greedy(tiny_model, prompt, 12)
    cuts = [ref_text.find(s) for s in DEFAULT_CHAT_STOPS if s in ref_text]
    expected = ref_text[: min(cuts)] if cuts else ref_text

    resp = server.client.post("/v1/chat/completions", headers=_auth(server.key),
                              json={"model": "tiny", "messages": messages, "max_tokens": 12, "temperature": 0})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny:v1"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected}
    assert body["usage"]["prompt_tokens"] == len(tiny_model.tokenizer(prompt)["input_ids"])


def test_streamed_completion_equals_the_plain_answer(server):
    body = {"prompt": "the quick brown", "max_tokens": 20, "temperature": 0}
    plain = _complete(server, body)
    assert plain.status_code == 200, plain.text
    with server.client.stream("POST", "/v1/completions", headers=_auth(server.key),
                              json={**body, "stream": True, "stream_options": {"include_usage": True}}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert all(e["object"] == "text_completion" and e["model"] == "tiny:v1" for e in chunks)
    assert len(chunks) >= 3  # token by token, not one blob
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain.json()["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["usage"] == plain.json()["usage"]


def test_streamed_chat_and_stream_errors(server):
    body = {"messages": [{"role": "user", "content": "ray serve"}], "max_tokens": 10, "temperature": 0}
    plain = server.client.post("/v1/chat/completions", headers=_auth(server.key), json=body)
    assert plain.status_code == 200, plain.text
    with server.client.stream("POST", "/v1/chat/completions", headers=_auth(server.key),
                              json={**body, "stream": True}) as resp:
        assert resp.status_code == 200
        events = _sse_events(resp)
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:-1])
    assert text == plain.json()["choices"][0]["message"]["content"]
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    # a streaming request with a mistake is a plain 4xx JSON answer, not an event stream
    resp = server.client.post("/v1/chat/completions", headers=_auth(server.key),
                              json={**body, "stream": True, "max_tokens": MAX_TOKENS_CAP + 1})
    _assert_error(resp, 400, "max_tokens", str(MAX_TOKENS_CAP))


@pytest.mark.parametrize(
    "body, needles",
    [
        ({}, ["messages", "required"]),
        ({"messages": []}, ["messages"]),
        ({"messages": "hi"}, ["messages"]),
        ({"messages": [{"role": "robot", "content": "hi"}]}, ["messages"]),
        ({"messages": [{"role": "user", "content": "hi", "extra": 1}]}, ["messages.0.extra"]),
        ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": MAX_TOKENS_CAP + 1},
         ["max_completion_tokens", str(MAX_TOKENS_CAP)]),
        ({"messages": [{"role": "user", "content": "zebra " * 80}]}, ["messages", str(N_POSITIONS)]),
    ],
    ids=["missing", "empty", "string", "bad-role", "extra-key", "over-cap", "too-long"],
)
def test_chat_mistakes_get_400(server, body, needles):
    resp = server.client.post("/v1/chat/completions", headers=_auth(server.key), json=body)
    _assert_error(resp, 400, *needles)


def test_n_choices_and_summed_usage(server):
    body = {"prompt": "hello", "max_tokens": 6, "temperature": 1.0, "seed": 7, "n": 3}
    resp = _complete(server, body)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert out["usage"]["completion_tokens"] == sum(
        _complete(server, {**body, "n": 1, "seed": 7 + i}).json()["usage"]["completion_tokens"] for i in range(3)
    )
    # choice i is the single answer seeded seed + i
    assert out["choices"][1]["text"] == _complete(server, {**body, "n": 1, "seed": 8}).json()["choices"][0]["text"]


def test_top_p_below_float32_range_still_streams(server):
    body = {"prompt": "The", "max_tokens": 3, "stream": True, "temperature": 1, "top_p": 1e-300, "seed": 1}
    resp = server.client.post("/v1/completions", headers=_auth(server.key), json=body)
    assert resp.status_code == 200
    assert resp.text.rstrip().endswith("data: [DONE]")


def test_client_disconnect_mid_stream_leaves_the_replica_serving(server):
    body = {"prompt": "hello", "max_tokens": MAX_TOKENS_CAP, "temperature": 0, "stream": True}
    for _ in range(3):
        with server.client.stream("POST", "/v1/completions", headers=_auth(server.key), json=body) as resp:
            assert resp.status_code == 200
            next(resp.iter_lines())  # one chunk, then hang up
    resp = _complete(server, {"prompt": "hello", "max_tokens": 4, "temperature": 0}, timeout=60)
    assert resp.status_code == 200, resp.text
    assert server.client.get("/healthz", timeout=30).status_code == 200


def test_openai_client_chat_and_streaming(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=server.key, max_retries=0)
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=5, temperature=0
    )
    assert chat.model == "tiny:v1" and chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens <= 5

    plain = client.completions.create(model="tiny", prompt="ray serve", max_tokens=8, temperature=0)
    stream = client.completions.create(model="tiny", prompt="ray serve", max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == plain.choices[0].text

    chat_stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(chat_stream)
    assert "".join((c.choices[0].delta.content or "") for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[], max_tokens=2)


def _metric(text: str, name: str, **labels) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (Prometheus text format)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_metrics_count_requests_per_version(server):
    def scrape() -> str:
        resp = server.client.get("/metrics", headers=_auth(server.key))
        assert resp.status_code == 200, resp.text
        return resp.text

    labels = dict(model="tiny", version="v1", route="completions", status="200")
    before = scrape()
    n = 5
    for _ in range(n):
        assert _complete(server, {"prompt": "hi", "max_tokens": 3, "temperature": 0}).status_code == 200
    assert _complete(server, {"prompt": "hi", "max_tokens": 0}).status_code == 400
    after = scrape()
    assert _metric(after, "zeroplane_requests_total", **labels) - _metric(before, "zeroplane_requests_total", **labels) == n
    assert _metric(after, "zeroplane_request_errors_total", model="tiny", version="v1", status="400") >= 1
    assert (_metric(after, "zeroplane_generated_tokens_total", model="tiny", version="v1")
            - _metric(before, "zeroplane_generated_tokens_total", model="tiny", version="v1")) == 3 * n
    assert _metric(after, "zeroplane_request_latency_seconds_count", model="tiny", version="v1") >= n
    assert server.client.get("/metrics").status_code == 401


# ----------------------------------------------------------------------------------------- security limits


def _poll(send, done, what: str, deadline_s: float = 60.0) -> httpx.Response:
    """Call ``send()`` until ``done(response)``; fail after ``deadline_s`` (a hang guard, not a speed bound)."""
    end = time.monotonic() + deadline_s
    while True:
        resp = send()
        if done(resp):
            return resp
        assert time.monotonic() < end, f"{what}: still {resp.status_code} {resp.text[:200]}"
        time.sleep(0.2)


def _assert_server_error(resp: httpx.Response, status: int, code: str, *needles: str) -> None:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["type"] == "server_error" and err["code"] == code, err
    for needle in needles:
        assert needle in err["message"], err["message"]


@pytest.fixture(scope="module")
def guard(server, tiny_model, tmp_path_factory):
    """A second app at /guard with its own key store and small bounds: keys re-read every 0.2 s and
    trusted for GUARD_MAX_STALE_S while the store is unreadable, generation bounded by 1 ms (so every
    generation times out: the batcher alone waits 50 ms)."""
    from ray import serve

    from zeroplane import serve_keys
    from zeroplane.layout import KEYS_FILE
    from zeroplane.runtime.serve.app import build_app

    storage = str(tmp_path_factory.mktemp("guard-storage"))
    key, _ = serve_keys.create_key(storage, name="guard")
    args = {
        "model_name": "tiny", "version": "v1", "model_uri": tiny_model.path, "storage_path": storage,
        "max_tokens_cap": MAX_TOKENS_CAP, "batch_wait_timeout_s": 0.05, "key_cache_ttl_s": 0.2,
        "key_max_stale_s": GUARD_MAX_STALE_S, "request_timeout_s": 0.001,
    }
    serve.run(build_app(args), name="guard", route_prefix="/guard")
    base_url = server.base_url.rsplit("/", 1)[0] + "/guard"
    try:
        with httpx.Client(base_url=base_url, timeout=60) as client:
            yield SimpleNamespace(client=client, key=key, keys_file=Path(storage) / KEYS_FILE)
    finally:
        serve.delete("guard")


def _release_fifo(path: Path) -> None:
    """Wake a reader blocked opening the FIFO ``path`` (it then reads EOF); nothing when none waits."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


@pytest.mark.parametrize("outage", ["unreadable", "hanging"])
def test_key_store_outage_answers_503_once_the_cached_keys_are_too_old(guard, outage):
    """Revocation must not stop working in an outage: past key_max_stale_s the replica answers 503
    instead of trusting its cached keys; a read that hangs holds no request (each gets an answer)."""
    def models() -> httpx.Response:
        return guard.client.get("/v1/models", headers=_auth(guard.key))

    assert models().status_code == 200  # the replica caches the keys
    saved = guard.keys_file.read_bytes()
    guard.keys_file.unlink()
    if outage == "unreadable":
        guard.keys_file.mkdir()  # exists but cannot be read: an outage, not "no keys"
    else:
        os.mkfifo(guard.keys_file)  # opening it for reading blocks until a writer comes
    try:
        resp = _poll(models, lambda r: r.status_code != 200, "requests during the key store outage")
        _assert_server_error(resp, 503, "key_store_unavailable", "key_max_stale_s")
        assert guard.client.get("/healthz").status_code == 200
    finally:
        if outage == "unreadable":
            guard.keys_file.rmdir()
        else:
            _release_fifo(guard.keys_file)
            guard.keys_file.unlink()
        guard.keys_file.write_bytes(saved)
    _poll(models, lambda r: r.status_code == 200, "requests after the key store is back")


def _chunked_post_without_end(server, path: str, total: int, chunk: int = 64 * 1024) -> tuple[int, dict]:
    """POST ``total`` bytes with ``Transfer-Encoding: chunked`` over a raw socket, never sending the
    terminating chunk, then read the answer: ``(status, JSON body)``. A server that waits for the whole
    body before checking its size never answers (the 60 s socket timeout fails the test)."""
    import json
    from urllib.parse import urlsplit

    url = urlsplit(server.base_url)
    head = (
        f"POST {url.path}{path} HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {server.key}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    with socket.create_connection((url.hostname, url.port), timeout=60) as sock:
        sock.sendall(head)
        sent = 0
        while sent < total:
            data = b"{" if sent == 0 else b" " * min(chunk, total - sent)
            sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))
            sent += len(data)
        raw = b""
        while b"\r\n\r\n" not in raw:
            raw += sock.recv(65536) or pytest.fail(f"connection closed before an answer: {raw!r}")
        header, _, body = raw.partition(b"\r\n\r\n")
        lines = header.decode("latin-1").split("\r\n")
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(fields["content-length"])
        while len(body) < length:
            body += sock.recv(65536) or pytest.fail("connection closed mid-answer")
    return int(lines[0].split()[1]), json.loads(body[:length])


def test_chunked_body_over_the_limit_gets_413_while_streaming(server):
    status, body = _chunked_post_without_end(server, "/v1/completions", MAX_BODY_BYTES + 64 * 1024)
    assert status == 413, body
    assert body["error"]["type"] == "invalid_request_error"
    assert str(MAX_BODY_BYTES) in body["error"]["message"]
    assert _complete(server, {"prompt": "hi", "max_tokens": 1}).status_code == 200


def test_generation_past_the_request_timeout_ends_with_an_error(guard):
    body = {"prompt": "hello", "max_tokens": MAX_TOKENS_CAP, "temperature": 0}
    resp = guard.client.post("/v1/completions", headers=_auth(guard.key), json=body)
    _assert_server_error(resp, 504, "request_timeout", "request_timeout_s")
    with guard.client.stream("POST", "/v1/completions", headers=_auth(guard.key),
                             json={**body, "stream": True}) as resp:
        assert resp.status_code == 200
        events = _sse_events(resp)
    assert events[-1] != "[DONE]", "a timed-out stream must not end as if complete"
    assert events[-1]["error"]["code"] == "request_timeout", events[-1]
    assert guard.client.get("/healthz").status_code == 200


def test_one_openai_base_url_picks_the_application_by_model(server):
    """The /v1 gateway next to the per-model prefix: ``model`` picks the application (and a version)."""
    openai = pytest.importorskip("openai")
    from ray import serve

    from zeroplane.names import GATEWAY_APP, GATEWAY_PREFIX
    from zeroplane.runtime.serve.gateway import build_gateway

    serve.run(build_gateway({"storage_path": server.storage}), name=GATEWAY_APP, route_prefix=GATEWAY_PREFIX)
    root = server.base_url.rsplit("/", 1)[0]
    client = openai.OpenAI(base_url=f"{root}/v1", api_key=server.key, max_retries=0)
    body = dict(prompt="ray serve", max_tokens=6, temperature=0)
    direct = _complete(server, {**body, "model": "tiny"}).json()["choices"][0]["text"]
    assert client.completions.create(model="tiny", **body).choices[0].text == direct
    assert client.completions.create(model="tiny:v1", **body).choices[0].text == direct
    streamed = client.completions.create(model="tiny", stream=True, **body)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == direct
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert chat.model == "tiny:v1"
    listed = [m.id for m in client.models.list().data]  # every application (the guard app serves tiny too)
    assert "tiny:v1" in listed and all(":v" in m for m in listed)
    for model in ("tiny:v9", "nope"):
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=model, **body)
    resp = httpx.post(f"{root}/v1/completions", json={**body, "model": "tiny"})
    assert resp.status_code == 401  # the key is checked here too
    serve.delete(GATEWAY_APP)
