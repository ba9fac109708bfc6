"""Canary gates: windows read from Prometheus text as Ray's metrics agent exports it, p95 as Prometheus'
histogram_quantile computes it, the decision, and the held-out evaluation in bits per byte on real
tiny models built from a config."""

from __future__ import annotations

import math

import pytest

from zeroplane import gates
from zeroplane.gates import GatePolicy, Window, decide, difference, parse_samples, quantile

PAGE = """# HELP ray_zeroplane_requests_total Requests answered.
# TYPE ray_zeroplane_requests_total counter
ray_zeroplane_requests_total{model="tiny",version="v1",route="completions",status="200",replica="a"} 90.0
ray_zeroplane_requests_total{model="tiny",version="v1",route="completions",status="200",replica="b"} 10.0
ray_zeroplane_requests_total{model="tiny",version="v2",route="completions",status="400",replica="c"} 4.0
ray_zeroplane_requests_total{model="tiny",version="v2",route="completions",status="200",replica="c"} 16.0
# HELP ray_zeroplane_request_errors_total Requests answered with status >= 400.
# TYPE ray_zeroplane_request_errors_total counter
ray_zeroplane_request_errors_total{model="tiny",version="v2",route="completions",status="400",replica="c"} 4.0
# HELP ray_zeroplane_request_latency_seconds Request latency in seconds.
# TYPE ray_zeroplane_request_latency_seconds histogram
ray_zeroplane_request_latency_seconds_bucket{model="tiny",version="v1",route="completions",le="0.1"} 50.0
ray_zeroplane_request_latency_seconds_bucket{model="tiny",version="v1",route="completions",le="0.25"} 90.0
ray_zeroplane_request_latency_seconds_bucket{model="tiny",version="v1",route="completions",le="+Inf"} 100.0
ray_zeroplane_request_latency_seconds_count{model="tiny",version="v1",route="completions"} 100.0
ray_zeroplane_request_latency_seconds_sum{model="tiny",version="v1",route="completions"} 12.0
"""


def test_a_page_sums_replicas_per_version():
    got = parse_samples(PAGE)
    assert (got[("tiny", "v1")].requests, got[("tiny", "v1")].errors) == (100.0, 0.0)
    assert (got[("tiny", "v2")].requests, got[("tiny", "v2")].errors) == (20.0, 4.0)
    assert got[("tiny", "v2")].error_rate == 0.2
    assert got[("tiny", "v1")].buckets == {0.1: 50.0, 0.25: 90.0, math.inf: 100.0}


def test_p95_interpolates_inside_its_bucket_like_histogram_quantile():
    assert quantile(0.5, {0.1: 50.0, 0.25: 90.0, math.inf: 100.0}) == pytest.approx(0.1)
    assert quantile(0.7, {0.1: 50.0, 0.25: 90.0, math.inf: 100.0}) == pytest.approx(0.175)
    assert quantile(0.95, {0.1: 50.0, 0.25: 90.0, math.inf: 100.0}) == 0.25  # in +Inf: the largest finite bound
    assert quantile(0.95, {}) is None and quantile(0.95, {0.1: 0.0, math.inf: 0.0}) is None


def test_a_window_is_the_difference_of_two_readings_and_never_negative():
    start = Window(10, 1, {0.1: 5.0, math.inf: 10.0})
    end = Window(30, 2, {0.1: 5.0, math.inf: 30.0})
    w = difference(end, start)
    assert (w.requests, w.errors, w.buckets) == (20, 1, {0.1: 0.0, math.inf: 20.0})
    restarted = difference(Window(3, 0, {math.inf: 3.0}), start)  # a replica restarted: counters reset
    assert restarted.requests == 0 and restarted.buckets == {math.inf: 0.0}


POLICY = GatePolicy(max_error_rate=0.05, max_p95_latency_ratio=1.5, min_requests=10)


def _w(requests, errors, p95_bucket):
    return Window(requests, errors, {0.1: requests if p95_bucket == 0.1 else 0.0, 1.0: requests, math.inf: requests})


def test_decisions_name_their_numbers():
    stable = _w(100, 0, 0.1)
    assert decide(POLICY, stable, _w(5, 0, 0.1))[0] == "wait"
    kind, why = decide(POLICY, stable, _w(20, 4, 0.1))
    assert kind == "rollback" and "0.200 (4/20)" in why and "max_error_rate 0.05" in why
    kind, why = decide(POLICY, stable, _w(20, 0, 1.0))  # p95 ~0.95 s against ~0.095 s
    assert kind == "rollback" and "max_p95_latency_ratio 1.5" in why
    kind, why = decide(POLICY, stable, _w(20, 0, 0.1))
    assert kind == "advance" and "20 requests" in why
    assert decide(POLICY, Window(buckets={}), _w(20, 0, 1.0))[0] == "advance"  # no stable traffic: no ratio


def _tiny(path, scale: float = 1.0) -> str:
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    text = ["the quick brown fox jumps over the lazy dog."] * 20
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(text, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tok), n_positions=32))
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(scale)  # sharper random predictions: a worse model
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_bits_per_byte_ranks_a_worse_model_worse(tmp_path):
    texts = ["the lazy dog jumps over the quick brown fox. " * 6]
    base = gates.bits_per_byte(_tiny(tmp_path / "a"), texts)
    assert base == gates.bits_per_byte(_tiny(tmp_path / "a2"), texts)  # the same weights: the same number
    assert 0 < base < 20
    assert gates.bits_per_byte(_tiny(tmp_path / "b", scale=30.0), texts) > base + 1.0
    with pytest.raises(ValueError, match="no held-out text"):
        gates.bits_per_byte(_tiny(tmp_path / "c"), ["a"])
