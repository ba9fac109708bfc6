"""Serving benchmark: the continuous batching engine next to the old batched-generate engine, same replica,
same workloads, over real HTTP, in rounds (``--repeats``, 3) that each measure both engines in turn; every ratio
is reported as the median of its rounds with their range (a single run moved by up to 1.5x on this shared host).

For each engine (``serve.engine`` ``generate``, then ``continuous``; ``max_batch_size`` 16):

* **mix** — requests whose prompt is 8–200 tokens and whose ``max_tokens`` is 16–128 (seeded draws), half
  streaming and half sampled (temperature 0.8, seeded; the other half greedy), the same requests sent by 1
  client and by 16 concurrent clients (a closed loop: each client sends the next request when its last one
  ends): requests/s of each, and their ratio (goal >= 4);
* **streams** — 1 stream alone and 16 concurrent streams (32-token prompt, 64 new tokens, greedy):
  aggregate generated tokens/s of each and their ratio (goal >= 4), and time to first token (TTFT): p95 at
  16 streams over p50 at 1 stream (goal <= 3);
* **Serve path** — one client, a greedy 16-token non-streaming request: p50 over HTTP over the p50 of the same
  engine called in this process (goal <= 1.15), measured in alternation (one request in process, then one over
  HTTP) so that the machine's speed, which drifts on a shared host, is the same for both.

Usage: ``python bench/serve_bench.py [--mix-requests 64] [--repeats 3] [--engines generate,continuous]``.
Starts its own local Ray (``address="local"``, 4 logical CPUs) and one replica (1 CPU; Ray gives it
OMP_NUM_THREADS=1, and the in-process baselines run on one thread alike); the model is a 4-layer GPT-2 built from a config with a BPE
tokenizer trained here (nothing downloaded). Prints a table and writes ``bench/results/serve_bench.json`` and
``serve_bench.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import sys
import tempfile
import threading
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
#: Goals of the issue this benchmark answers (ratios).
GOALS = {"mix_16_over_1_req_per_s": 4.0, "streams_16_over_1_tokens_per_s": 4.0,
         "serve_over_in_process_p50": 1.15, "ttft_p95_16_over_p50_1": 3.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(path: Path):
    """A 4-layer, 128-wide GPT-2 (~1 M parameters, 512-token context) and its tokenizer, saved to ``path``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=512, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=len(tok), n_positions=512,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        model.transformer.wte.weight[tok.eos_token_id].zero_()  # greedy never stops early: fixed lengths
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


def prompt_of(tok, n_tokens: int) -> str:
    """A prompt of about ``n_tokens`` tokens cut from the corpus."""
    ids = tok(" ".join(CORPUS))["input_ids"][:n_tokens]
    return tok.decode(ids)


def mix_bodies(tok, n: int, seed: int) -> list[dict]:
    """``n`` request bodies: prompts 8-200 tokens, max_tokens 16-128, every other one streaming, every other
    pair sampled (temperature 0.8, seeded)."""
    rng = random.Random(seed)
    bodies = []
    for i in range(n):
        body = {"prompt": prompt_of(tok, rng.randint(8, 200)), "max_tokens": rng.randint(16, 128),
                "temperature": 0.0, "stream": i % 2 == 0}
        if (i // 2) % 2 == 0:
            body.update(temperature=0.8, seed=rng.randrange(2**31))
        bodies.append(body)
    return bodies


def send(session: requests.Session, url: str, body: dict) -> dict:
    """One completion; returns ``{"latency_s", "ttft_s" (streams), "tokens"}``."""
    t = time.perf_counter()
    if not body.get("stream"):
        r = session.post(f"{url}/v1/completions", json=body, timeout=600)
        r.raise_for_status()
        return {"latency_s": time.perf_counter() - t, "tokens": r.json()["usage"]["completion_tokens"]}
    ttft, tokens = None, 0
    with session.post(f"{url}/v1/completions", json={**body, "stream_options": {"include_usage": True}},
                      timeout=600, stream=True) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[len(b"data: "):])
            if ttft is None and any(c.get("text") for c in event.get("choices", [])):
                ttft = time.perf_counter() - t
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return {"latency_s": time.perf_counter() - t, "ttft_s": ttft, "tokens": tokens}


def http_run(url: str, clients: int, bodies: list[dict]) -> dict:
    """A closed loop at ``clients`` concurrency: ``clients`` threads, each sending the next unsent body of
    ``bodies`` as soon as its previous request ends, until all are sent. (A fixed share per client would leave
    clients idle while the one with the longest share finishes, and count that tail against the rate.)"""
    pending = iter(bodies)
    lock = threading.Lock()

    def client(_):
        out = []
        with requests.Session() as s:
            while True:
                with lock:
                    nxt = next(pending, None)
                if nxt is None:
                    return out
                out.append(send(s, url, nxt))

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [x for part in pool.map(client, range(clients)) for x in part]
    return summarize(results, clients, time.perf_counter() - started)


def summarize(results: list[dict], clients: int, wall: float) -> dict:
    """Rates, latency and TTFT percentiles (ms) of :func:`send` results that took ``wall`` seconds in all."""
    lats = sorted(r["latency_s"] for r in results)
    ttfts = sorted(r["ttft_s"] for r in results if r.get("ttft_s") is not None)
    return {"clients": clients, "requests": len(results), "wall_s": wall, "req_per_s": len(results) / wall,
            "tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "p50_ms": statistics.median(lats) * 1e3, "p95_ms": _pct(lats, 0.95) * 1e3,
            "ttft_p50_ms": statistics.median(ttfts) * 1e3 if ttfts else None,
            "ttft_p95_ms": _pct(ttfts, 0.95) * 1e3 if ttfts else None}


def _pct(s: list[float], q: float) -> float:
    return s[min(len(s) - 1, max(0, int(round(q * len(s))) - 1))]


class InProcess:
    """The engine ``engine_kind`` built in this process (one thread) on the bench model, answering ``body``
    the way a replica's engine does (tokenize, generate, decode) without Serve or HTTP in between."""

    def __init__(self, engine_kind: str, model, tok, body: dict) -> None:
        from zeroplane.runtime.serve.engine import ContinuousBatchingEngine, GenerateEngine, pad_id

        torch.set_num_threads(1)
        self.kind, self.tok, self.body = engine_kind, tok, body
        if engine_kind == "continuous":
            self.engine = ContinuousBatchingEngine(model, tok.eos_token_id, 16)
            self.engine.warmup()
        else:
            self.engine = GenerateEngine(model, torch.device("cpu"), tok.eos_token_id, pad_id(tok), 16, 0.01)

    async def _one(self) -> float:
        from zeroplane.runtime.serve.protocol import Job

        t = time.perf_counter()
        ids = self.tok(self.body["prompt"])["input_ids"]
        job = Job(ids, self.body["max_tokens"], 0.0, 1.0, None, time.monotonic() + 60)
        if self.kind == "continuous":
            out = []
            async for part in self.engine.generate(job, False):
                out += part
        else:  # the batched generate call itself (its @serve.batch queue needs a Serve replica)
            out = self.engine._run_jobs([job])[0]
        self.tok.decode(out, skip_special_tokens=True)
        return time.perf_counter() - t

    def once_s(self) -> float:
        """Seconds of one request through the engine in this process."""
        return asyncio.run(self._one())

    def close(self) -> None:
        self.engine.shutdown()


def paired_path(url: str, in_process: InProcess, n: int) -> dict:
    """The Serve path against the same engine in process, measured in alternation (request ``i`` over HTTP
    right after request ``i`` in process, so that a machine that slows down or speeds up during the run moves
    both): ``n`` pairs after two warm-up pairs; p50 of each and ``serve_over_in_process_p50``, their ratio."""
    http, local = [], []
    with requests.Session() as s:
        for i in range(n + 2):
            t_local = in_process.once_s()
            result = send(s, url, in_process.body)
            if i >= 2:
                local.append(t_local)
                http.append(result)
    out = summarize(http, 1, sum(r["latency_s"] for r in http))
    out["in_process_p50_ms"] = statistics.median(local) * 1e3
    out["serve_over_in_process_p50"] = out["p50_ms"] / out["in_process_p50_ms"]
    return out


def measure_engine(url: str, engine: str, model, tok, model_dir: Path, args, path_body: dict,
                   stream_body: dict) -> dict:
    """Deploy ``engine`` as application ``bench`` and run every workload of the module docstring against it
    once; returns each run's summary and the four ratios. The application is deleted afterwards."""
    from ray import serve

    from zeroplane.runtime.serve.app import build_app

    serve.run(build_app({"model_name": "bench", "version": "v1", "model_uri": str(model_dir), "auth": False,
                         "max_tokens_cap": 128, "max_batch_size": 16, "batch_wait_timeout_s": 0.01,
                         "engine": engine}), name="bench", route_prefix="/bench")
    try:
        http_run(url, 1, mix_bodies(tok, 4, seed=99))  # warm-up
        local = InProcess(engine, model, tok, path_body)
        try:
            path = paired_path(url, local, args.single_requests)
        finally:
            local.close()
        mix = mix_bodies(tok, args.mix_requests, seed=1)
        r = {"path_1": path, "mix_1": http_run(url, 1, mix), "mix_16": http_run(url, 16, mix),
             "stream_1": http_run(url, 1, [stream_body] * 4),
             "stream_16": http_run(url, 16, [stream_body] * 32)}
    finally:
        serve.delete("bench")
    r["ratios"] = {**load_ratios(r), "serve_over_in_process_p50": path["serve_over_in_process_p50"]}
    return r


def load_ratios(r: dict) -> dict:
    """The mix, streams and TTFT ratios of a round's ``mix_1``/``mix_16``/``stream_1``/``stream_16`` runs."""
    return {
        "mix_16_over_1_req_per_s": r["mix_16"]["req_per_s"] / r["mix_1"]["req_per_s"],
        "streams_16_over_1_tokens_per_s": r["stream_16"]["tokens_per_s"] / r["stream_1"]["tokens_per_s"],
        "ttft_p95_16_over_p50_1": r["stream_16"]["ttft_p95_ms"] / r["stream_1"]["ttft_p50_ms"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mix-requests", type=at_least(16), default=64,
                    help="Mixed requests; the 1-client and the 16-client runs send the same ones.")
    ap.add_argument("--single-requests", type=at_least(1), default=20, help="Requests of the Serve-path runs.")
    ap.add_argument("--engines", default="generate,continuous", help="Engines to compare, in this order.")
    ap.add_argument("--repeats", type=at_least(1), default=3,
                    help="Rounds; each measures every engine once, in order. A ratio is the median of its rounds.")
    args = ap.parse_args()
    engines = [e for e in args.engines.split(",") if e]

    import ray
    from ray import serve

    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="zeroplane-bench-"))
    model, tok = build_model(tmp)
    path_body = {"prompt": prompt_of(tok, 16), "max_tokens": 16, "temperature": 0}
    stream_body = {"prompt": prompt_of(tok, 32), "max_tokens": 64, "temperature": 0, "stream": True}

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/bench"
    rounds: dict = {e: [] for e in engines}
    try:
        for i in range(args.repeats):
            for engine in engines:
                r = measure_engine(url, engine, model, tok, tmp, args, path_body, stream_body)
                rounds[engine].append(r)
                print(f"  round {i + 1} {engine}: " + ", ".join(f"{k} {v:.2f}" for k, v in r["ratios"].items()),
                      file=sys.stderr)
    finally:
        serve.shutdown()
        ray.shutdown()

    # Per engine: the median of each ratio over the rounds, its range, and every round's runs.
    runs = {e: {"ratios": {k: statistics.median(r["ratios"][k] for r in rs) for k in GOALS},
                "ratio_range": {k: [min(r["ratios"][k] for r in rs), max(r["ratios"][k] for r in rs)] for k in GOALS},
                "rounds": rs} for e, rs in rounds.items()}
    result = {
        "benchmark": "serve", "machine": machine(),
        "model": {"layers": 4, "width": 128, "params": sum(p.numel() for p in model.parameters())},
        "max_batch_size": 16, "repeats": args.repeats, "goals": GOALS,
        "in_process_p50_ms": {e: statistics.median(r["path_1"]["in_process_p50_ms"] for r in rs)
                              for e, rs in rounds.items()},
        "engines": runs, "total_s": time.monotonic() - t0,
    }
    print(f"\nserving: {result['model']['params'] / 1e6:.2f} M-param GPT-2, one replica, max_batch_size 16, "
          f"{args.repeats} rounds")
    keys = ["mix_1", "mix_16", "stream_1", "stream_16", "path_1"]
    print(table(["engine", "round", "run", "req/s", "tokens/s", "p50 ms", "p95 ms", "TTFT p50 ms", "TTFT p95 ms"],
                [[e, i + 1, k, r[k]["req_per_s"], r[k]["tokens_per_s"], r[k]["p50_ms"], r[k]["p95_ms"],
                  r[k]["ttft_p50_ms"] or 0.0, r[k]["ttft_p95_ms"] or 0.0]
                 for e, rs in rounds.items() for i, r in enumerate(rs) for k in keys]))
    print(table(["ratio (median of rounds)", "goal"] + [f"{e} (range)" for e in runs],
                [[k, g] + [f"{runs[e]['ratios'][k]:.2f} ({runs[e]['ratio_range'][k][0]:.2f}-"
                           f"{runs[e]['ratio_range'][k][1]:.2f})" for e in runs] for k, g in GOALS.items()]))
    out = write_result("serve_bench", result)
    png = bar_plot("serve_bench", f"Serving ratios per engine, median of {args.repeats} rounds (goal lines in the "
                   "README)", list(GOALS), {e: [runs[e]["ratios"][k] for k in GOALS] for e in runs}, "ratio")
    print(f"wrote {out} and {png} ({result['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
