"""Serving benchmark: requests/s and p50/p99 latency of the zeroplane Serve app over real HTTP, for 1 and 16
concurrent clients, with batching off (max_batch_size 1) and on (max_batch_size 8), and the latency the Serve
path adds over calling the same model's ``generate`` in this process (ratio of medians, one client), and each
configuration's requests/s against in-process ``generate`` called back to back (1 / its median latency).

Usage: ``python bench/serve_bench.py [--requests-per-client 12] [--max-tokens 16]``. Starts its own local Ray
(``address="local"``, 4 logical CPUs) and one replica; the model is a 4-layer GPT-2 built from a config with a
BPE tokenizer trained here (nothing downloaded). Prints a table and writes ``bench/results/serve_bench.json``
and ``serve_bench.png``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch
from _common import at_least, bar_plot, machine, table, write_result

CORPUS = [
    "the quick brown fox jumps over the lazy dog.",
    "ray serve answers requests in batches on every replica.",
    "deepspeed zero shards optimizer states across data parallel workers.",
    "a control plane trains, promotes and serves language models.",
] * 50
PROMPT = "ray serve answers requests"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(path: Path):
    """A 4-layer, 128-wide GPT-2 (~1 M parameters) and its tokenizer, saved to ``path``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=512, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=len(tok), n_positions=256,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        model.transformer.wte.weight[tok.eos_token_id].zero_()  # greedy never stops early: fixed lengths
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


def in_process_latencies(model, tok, n: int, max_tokens: int) -> list[float]:
    """Seconds per greedy ``generate`` of ``max_tokens`` new tokens, in this process, on one thread (a Serve
    replica with num_cpus 1 gets OMP_NUM_THREADS=1 from Ray, so both sides compute alike)."""
    torch.set_num_threads(1)
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    out = []
    with torch.inference_mode():
        for i in range(n + 2):
            t = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                           do_sample=False, pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
            if i >= 2:  # warm-up
                out.append(time.perf_counter() - t)
    return out


def http_run(url: str, clients: int, per_client: int, max_tokens: int) -> dict:
    """``clients`` threads each sending ``per_client`` completions back to back; latency stats and req/s."""
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}

    def client(_):
        lat = []
        with requests.Session() as s:
            for _ in range(per_client):
                t = time.perf_counter()
                r = s.post(f"{url}/v1/completions", json=body, timeout=300)
                r.raise_for_status()
                assert r.json()["usage"]["completion_tokens"] == max_tokens
                lat.append(time.perf_counter() - t)
        return lat

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        lats = [x for part in pool.map(client, range(clients)) for x in part]
    wall = time.perf_counter() - started
    return _stats(lats) | {"clients": clients, "requests": len(lats), "wall_s": wall, "req_per_s": len(lats) / wall}


def _stats(lats: list[float]) -> dict:
    s = sorted(lats)
    p99 = s[min(len(s) - 1, max(0, int(round(0.99 * len(s))) - 1))]
    return {"p50_ms": statistics.median(s) * 1e3, "p99_ms": p99 * 1e3, "mean_ms": statistics.fmean(s) * 1e3}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests-per-client", type=at_least(1), default=12, help="Requests each client sends (16 clients).")
    ap.add_argument("--single-requests", type=at_least(1), default=30, help="Requests of the 1-client runs.")
    ap.add_argument("--max-tokens", type=at_least(1), default=16, help="New tokens per request.")
    args = ap.parse_args()

    import ray
    from ray import serve

    from zeroplane.runtime.serve.app import build_app

    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="zeroplane-bench-"))
    model, tok = build_model(tmp)
    baseline = in_process_latencies(model, tok, args.single_requests, args.max_tokens)

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/bench"
    rows = []
    try:
        for mbs in (1, 8):
            serve.run(build_app({"model_name": "bench", "version": "v1", "model_uri": str(tmp), "auth": False,
                                 "max_tokens_cap": max(64, args.max_tokens), "max_batch_size": mbs, "batch_wait_timeout_s": 0.01}),
                      name="bench", route_prefix="/bench")
            http_run(url, 1, 3, args.max_tokens)  # warm-up
            for clients, per in ((1, args.single_requests), (16, args.requests_per_client)):
                r = http_run(url, clients, per, args.max_tokens)
                rows.append({"max_batch_size": mbs, **r})
                print(f"  batch {mbs:>2}  clients {clients:>2}: {r['req_per_s']:6.1f} req/s  "
                      f"p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms", file=sys.stderr)
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()

    base = _stats(baseline)
    base_rps = 1000.0 / base["p50_ms"]
    for r in rows:
        r["req_per_s_over_in_process"] = r["req_per_s"] / base_rps
    single = next(r for r in rows if r["max_batch_size"] == 1 and r["clients"] == 1)
    result = {
        "benchmark": "serve", "machine": machine(),
        "model": {"layers": 4, "width": 128, "params": sum(p.numel() for p in model.parameters())},
        "max_tokens": args.max_tokens,
        "in_process_generate": {**base, "req_per_s": base_rps},
        "serve": rows,
        "serve_over_in_process_p50_ratio": single["p50_ms"] / base["p50_ms"],
        "serve_added_p50_ms": single["p50_ms"] - base["p50_ms"],
        "total_s": time.monotonic() - t0,
    }

    print(f"\nserving: {result['model']['params'] / 1e6:.2f} M-param GPT-2, {args.max_tokens} new tokens per request, "
          f"greedy; in-process generate: p50 {base['p50_ms']:.1f} ms = {base_rps:.1f} req/s back to back")
    print(table(["max_batch_size", "clients", "req/s", "p50 ms", "p99 ms", "req/s vs in-process"],
                [[r["max_batch_size"], r["clients"], r["req_per_s"], r["p50_ms"], r["p99_ms"],
                  r["req_per_s_over_in_process"]] for r in rows]))
    print(f"Serve path (1 client, batch 1) p50 {single['p50_ms']:.1f} ms: "
          f"{result['serve_over_in_process_p50_ratio']:.2f}x in-process ({result['serve_added_p50_ms']:+.1f} ms)")
    out = write_result("serve_bench", result)
    labels = [f"batch {r['max_batch_size']}, {r['clients']} client{'s' if r['clients'] > 1 else ''}" for r in rows]
    png = bar_plot("serve_bench", "Ray Serve requests/s (in-process generate back to back: dashed)",
                   labels, {"req/s": [r["req_per_s"] for r in rows]}, "req/s", hline=base_rps)
    print(f"wrote {out} and {png} ({result['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
