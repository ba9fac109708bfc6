"""Data preparation and shard reading: memory at 1x vs 10x corpus, Ray Data vs one process, shards vs arrays,
and how much sooner a second job on a prepared dataset starts training.

Usage: ``python bench/data_bench.py [--mb 50] [--factor 10] [--steps 12]`` (about 17 minutes on 2 cores).

A generated JSONL corpus of ``--mb`` MB and one ``--factor`` times larger (files of 2.5 MB; documents of
50-400 words drawn with a fixed seed from the word list of the Python reference text, so the BPE sees a
realistic vocabulary). One byte-level BPE (8,192 tokens) is trained on the reference text and used as
``tokenizer.path`` by every run, so runs differ only in data. Each run is its own process (a fresh local
Ray, 4 logical CPUs) doing what the job driver does: ``build_train_loop_config`` (find or prepare the
dataset with Ray Data), then ``--steps`` steps of ``jobs/pydoc-gpt.yaml`` (2 workers, ZeRO-2).

* driver memory: the run process's peak RSS (``ru_maxrss``) right after preparation, 10x / 1x;
* worker memory: every rank's peak RSS from the last ``step`` event (``peak_rss_mb``), 10x / 1x;
* preparation tokens/s: the manifest's tokens over the Ray Data pipeline's time (read, tokenize, write
  shards), against one process reading the same 10x files and calling the tokenizer's own
  ``encode_batch`` over all their documents (the same parsing function, no shards written);
* training tokens/s: median of the ``step`` events' ``tokens_per_s`` after the first two steps, reading
  shards against the same sequences as in-memory arrays in the loop config (the pre-shard design);
* start: run start -> first ``step`` event, and run start -> data ready (``build_train_loop_config`` returned),
  the first 10x job (prepares) over a second one (reuses).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict

from _common import REPO, log, machine, table, write_result

SPEC = REPO / "jobs" / "pydoc-gpt.yaml"
FILE_MB = 2.5


def make_corpus(folder: Path, mb: float, seed: int = 0) -> int:
    """JSONL files of ``FILE_MB`` MB in ``folder`` holding ``mb`` MB in all; returns the documents written."""
    import numpy as np
    from pydoc_data.topics import topics

    words = sorted(set(re.findall(r"[A-Za-z_]+", " ".join(topics.values()))))
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    target, n_docs, k = int(mb * 2**20), 0, 0
    written = 0
    while written < target:
        lines, size = [], 0
        while size < FILE_MB * 2**20 and written + size < target:
            text = " ".join(rng.choice(words, size=int(rng.integers(50, 400))))
            line = json.dumps({"text": text.capitalize() + "."})
            lines.append(line)
            size += len(line) + 1
        (folder / f"part-{k:05d}.jsonl").write_text("\n".join(lines) + "\n")
        written, n_docs, k = written + size, n_docs + len(lines), k + 1
    return n_docs


def single_process_tokens_per_s(folder: Path, tokenizer_dir: str) -> Dict[str, float]:
    """One process: read every file, parse it as preparation does, ``encode_batch`` all documents."""
    from tokenizers import Tokenizer

    from zeroplane.runtime.train.prepare import documents_of_file

    tok = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
    t0 = time.perf_counter()
    tokens = 0
    for f in sorted(folder.glob("*.jsonl")):
        docs, _ = documents_of_file(str(f), f.read_bytes(), "text", "fail")
        tokens += sum(len(e.ids) + 1 for e in tok.encode_batch([d[0] for d in docs], add_special_tokens=False))
    elapsed = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed}


def child(args) -> None:
    """One run (its own process): find/prepare the dataset, train ``--steps`` steps, print one JSON line."""
    import ray

    from zeroplane.runtime.train.driver import build_train_loop_config, build_trainer
    from zeroplane.spec import load_spec
    from zeroplane.storage import Storage

    t0 = time.time()
    spec = load_spec(SPEC, [f"data.source={args.source}", f"checkpoint.storage_path={args.store}",
                            "tokenizer.train_bpe=null", f"tokenizer.path={args.tokenizer}", f"train.max_steps={args.steps}",
                            "train.warmup_steps=1", "train.eval_every_n_steps=1000", "train.eval_batches=1",
                            f"checkpoint.every_n_steps={args.steps}", "data.validation_fraction=0.01"])
    storage = Storage.for_checkpoint_spec(spec.checkpoint)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=True)
    config = build_train_loop_config(spec, f"bench-data-{int(t0)}-{os.getpid()}", storage)
    driver_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ready_s = time.time() - t0
    manifest = storage.read_json(f"{config['dataset']['folder']}/manifest.json")
    if args.in_memory:  # the pre-shard design: the whole split as arrays in the loop config
        from zeroplane.runtime.train.data import open_split

        for split in ("train", "val"):
            seqs = open_split(config, split, storage)
            config[split] = seqs[list(range(len(seqs)))]
    result = build_trainer(spec, config["job_id"], storage, config).fit()
    if result.error:
        raise SystemExit(f"run failed: {result.error}")
    print("BENCH_RESULT " + json.dumps({"t0": t0, "ready_s": ready_s, "driver_peak_rss_mb": driver_rss,
                                        "manifest": {k: manifest[k] for k in ("splits", "counts", "tokenize_s", "tokens_per_s")}}),
          flush=True)


def run_child(source: Path, store: str, tokenizer: str, steps: int, in_memory: bool = False) -> Dict[str, Any]:
    """Run :func:`child` in a new process; its result plus the progress events it logged."""
    from zeroplane.sdk import parse_progress

    cmd = [sys.executable, __file__, "--child", "--source", str(source), "--store", store, "--tokenizer", tokenizer,
           "--steps", str(steps)] + (["--in-memory"] if in_memory else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"child failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    out = json.loads(lines[-1][len("BENCH_RESULT "):])
    events = parse_progress(proc.stdout + proc.stderr)
    steps_ev = [e for e in events if e.get("event") == "step"]
    out["first_step_s"] = steps_ev[0]["t"] - out["t0"]
    out["tokens_per_s"] = statistics.median(e["tokens_per_s"] for e in steps_ev[2:] or steps_ev)
    out["worker_peak_rss_mb"] = next(e["peak_rss_mb"] for e in reversed(steps_ev) if "peak_rss_mb" in e)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=float, default=50.0, help="1x corpus size in MB (default 50: 50 MB and 500 MB with --factor 10)")
    p.add_argument("--factor", type=int, default=10, help="the large corpus is this many times larger (default 10)")
    p.add_argument("--steps", type=int, default=12, help="training steps per run (default 12)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--source", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    from zeroplane.runtime.train.data import train_bpe_tokenizer
    from zeroplane.runtime.train.prepare import pydoc_documents

    work = Path(tempfile.mkdtemp(prefix="zp-data-bench-"))
    tok_dir = str(work / "tokenizer")
    train_bpe_tokenizer("<|endoftext|>".join(pydoc_documents()), 8192).save_pretrained(tok_dir)
    small, large = work / "small", work / "large"
    log(f"corpora: {args.mb} MB and {args.mb * args.factor} MB of JSONL in {work}")
    docs = {"1x": make_corpus(small, args.mb, 0), f"{args.factor}x": make_corpus(large, args.mb * args.factor, 1)}
    store = str(work / "store")

    runs: Dict[str, Dict[str, Any]] = {}
    for label, src, mem in (("1x prepare+train", small, False), (f"{args.factor}x prepare+train", large, False),
                            (f"{args.factor}x reuse+train", large, False), ("1x in-memory arrays", small, True),
                            ("1x shards again", small, False)):
        log(f"run: {label}")
        runs[label] = run_child(src, store, tok_dir, args.steps, in_memory=mem)
    log("single process encode_batch over the large corpus")
    single = single_process_tokens_per_s(large, tok_dir)

    big = f"{args.factor}x prepare+train"
    shard_tps = max(runs["1x prepare+train"]["tokens_per_s"], runs["1x shards again"]["tokens_per_s"])
    ratios = {
        "driver_peak_rss_10x_over_1x": runs[big]["driver_peak_rss_mb"] / runs["1x prepare+train"]["driver_peak_rss_mb"],
        "worker_peak_rss_10x_over_1x": max(runs[big]["worker_peak_rss_mb"]) / max(runs["1x prepare+train"]["worker_peak_rss_mb"]),
        "ray_data_over_single_process_tokens_per_s": runs[big]["manifest"]["tokens_per_s"] / single["tokens_per_s"],
        "shards_over_in_memory_tokens_per_s": shard_tps / runs["1x in-memory arrays"]["tokens_per_s"],
        "first_over_second_job_start": runs[big]["first_step_s"] / runs[f"{args.factor}x reuse+train"]["first_step_s"],
        "first_over_second_data_ready": runs[big]["ready_s"] / runs[f"{args.factor}x reuse+train"]["ready_s"],
    }
    rows = [[k, round(v["ready_s"], 1), round(v["first_step_s"], 1), round(v["driver_peak_rss_mb"]),
             "/".join(str(round(x)) for x in v["worker_peak_rss_mb"]), round(v["tokens_per_s"]),
             v["manifest"]["splits"]["train"]["tokens"]] for k, v in runs.items()]
    print(table(["run", "data ready s", "first step s", "driver MB", "worker MB", "train tok/s", "train tokens"], rows))
    print(table(["ratio", "value"], [[k, round(v, 3)] for k, v in ratios.items()]))
    print(f"single process: {single['tokens_per_s']:,.0f} tokens/s; Ray Data: "
          f"{runs[big]['manifest']['tokens_per_s']:,.0f} tokens/s ({runs[big]['manifest']['tokenize_s']:.1f} s)")
    write_result("data_bench", {"machine": machine(), "args": vars(args), "documents": docs, "runs": runs,
                                "single_process": single, "ratios": ratios})


if __name__ == "__main__":
    main()
