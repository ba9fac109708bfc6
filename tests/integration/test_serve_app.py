"""The Serve application over real HTTP: a tiny GPT-2 built from a config, served by a local Ray.

One module-scoped Ray + Serve instance; every test talks to it through the Serve HTTP proxy.
"""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest
import torch

pytestmark = pytest.mark.integration

MAX_TOKENS_CAP = 48
N_POSITIONS = 64
CORPUS = [
    "the quick brown fox jumps over the lazy dog.",
    "hello world, this is a tiny corpus for a tiny tokenizer.",
    "ray serve answers requests in batches on every replica.",
    "deepspeed zero shards optimizer states across data parallel workers.",
] * 25


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
        ({"json": {"prompt": "hi", "temperature": -1}}, 400, ["temperature"]),
        ({"json": {"prompt": "hi", "top_p": 0}}, 400, ["top_p"]),
        ({"json": {"prompt": "hi", "stop": ""}}, 400, ["stop"]),
        ({"json": {"prompt": "hi", "stream": True}}, 400, ["stream"]),
        ({"json": {"prompt": "hi", "max_token": 3}}, 400, ["max_token"]),
        ({"json": {"prompt": "zebra " * 80, "max_tokens": 8}}, 400, ["prompt", str(N_POSITIONS)]),
        ({"json": {"prompt": "hi", "model": "other"}}, 404, ["other", "tiny"]),
    ],
    ids=[
        "empty-body", "not-json", "not-an-object", "prompt-missing", "prompt-empty", "prompt-int",
        "prompt-two", "max-tokens-over-cap", "max-tokens-string", "max-tokens-zero", "temperature-negative",
        "top-p-zero", "stop-empty", "stream", "unknown-field", "prompt-too-long", "unknown-model",
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
    while time.monotonic() - started < 15:
        revoked_status = _complete(server, body, key=server.key_to_revoke).status_code
        new_status = _complete(server, body, key=new_key).status_code
        if revoked_status == 401 and new_status == 200:
            break
        time.sleep(0.25)
    assert (revoked_status, new_status) == (401, 200)
    assert time.monotonic() - started < 8  # the replica re-reads the key file every 5 s
    assert _complete(server, body).status_code == 200  # other keys unaffected
    _assert_error(_complete(server, body, key=server.key_to_revoke), 401, "revoked")
