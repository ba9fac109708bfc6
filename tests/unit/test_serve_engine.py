"""The continuous batching engine on a tiny GPT-2 built from a config (no Ray), and the replica health check.

Covers: greedy output equals ``model.generate``; a seeded sampled request gives the same tokens alone and in
a batch with others; a closed job frees its slot at once and the next request is served; a wedged loop and
a hung key store read fail ``check_health``.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from zeroplane import serve_keys
from zeroplane.runtime.serve.auth import KeyCache
from zeroplane.runtime.serve.engine import ContinuousBatchingEngine
from zeroplane.runtime.serve.protocol import APIError, Job
from zeroplane.storage import Storage

EOS = 99


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64,
                                   bos_token_id=EOS, eos_token_id=EOS)).eval()
    with torch.no_grad():
        m.transformer.wte.weight[EOS].zero_()  # eos never wins greedily: lengths are predictable
    return m


@pytest.fixture
def engine(model):
    e = ContinuousBatchingEngine(model, EOS, max_batch_size=8, stall_s=0.2)
    e.warmup()
    yield e
    e.shutdown()


def job(prompt, max_tokens=10, temperature=0.0, seed=None):
    return Job(list(prompt), max_tokens, temperature, 0.9, seed, time.monotonic() + 60)


async def tokens(engine, j):
    out = []
    async for ids in engine.generate(j, stream=True):
        out += ids
    return out


def test_greedy_equals_generate_and_seeded_sampling_ignores_the_batch(engine, model):
    async def run():
        alone = await tokens(engine, job([1, 2, 3], temperature=0.8, seed=7))
        together = await asyncio.gather(
            tokens(engine, job([1, 2, 3], temperature=0.8, seed=7)),
            *(tokens(engine, job([4 + i, 5, 6, 7], temperature=0.5, seed=i)) for i in range(5)),
            tokens(engine, job([1, 2, 3, 4])),
        )
        other_seed = await tokens(engine, job([1, 2, 3], temperature=0.8, seed=8))
        return alone, together, other_seed

    alone, together, other_seed = asyncio.run(run())
    reference = model.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=10, do_sample=False, pad_token_id=EOS)
    assert together[-1] == reference[0, 4:].tolist()
    assert together[0] == alone and len(alone) == 10
    assert other_seed != alone


def test_a_closed_job_frees_its_slot_and_the_next_request_is_served(engine):
    async def run():
        stream = engine.generate(job([1, 2, 3], max_tokens=50), stream=True)
        first = await stream.__anext__()
        await stream.aclose()
        assert engine._active == 0 and not engine._manager.output_router.result_handlers
        return first, await tokens(engine, job([5, 6], max_tokens=5))

    first, after = asyncio.run(run())
    assert len(first) == 1 and len(after) == 5
    assert not engine._manager.batch_processor.scheduler.active_requests
    assert engine.health() is None


def test_a_wedged_loop_fails_the_health_check(engine):
    from zeroplane.runtime.serve import app
    from zeroplane.runtime.serve.server import ModelCore

    replica = app._Replica.__new__(app._Replica)

    class Tok:
        eos_token_id = EOS
        chat_template = None

    replica._core = ModelCore({"model_name": "m", "version": "v1", "model_uri": "/x", "auth": False}, Tok(), engine)
    replica.check_health()

    async def run():
        with engine._manager.pause():  # the loop takes no step: a request in flight makes no progress
            pending = asyncio.ensure_future(tokens(engine, job([1, 2], max_tokens=3)))
            while engine._active == 0:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)  # past stall_s (0.2 s)
            with pytest.raises(RuntimeError, match="finished no step"):
                replica.check_health()
        return await pending

    assert len(asyncio.run(run())) == 3
    replica.check_health()
    engine.shutdown()
    engine._manager.join(0, timeout=30)
    with pytest.raises(RuntimeError, match="not running"):
        replica.check_health()


def test_a_hung_key_store_read_fails_the_health_check(tmp_path, monkeypatch):
    serve_keys.create_key(str(tmp_path))
    release = threading.Event()
    monkeypatch.setattr(serve_keys, "load_records", lambda storage: release.wait())
    cache = KeyCache(Storage.from_uri(str(tmp_path)), ttl_s=5, max_stale_s=60, read_timeout_s=0.05, hang_s=0.1)
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(APIError) as err:  # the request does not wait for the hung read
            loop.run_until_complete(cache.records())
        assert err.value.http_status == 503
        assert cache.health() is None
        time.sleep(0.2)  # past hang_s
        assert "has hung" in cache.health()
    finally:
        release.set()
        loop.run_until_complete(cache._read)
        loop.close()
