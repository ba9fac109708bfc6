"""Memory per training worker by ZeRO stage: measured peak RSS against the ZeRO paper's model-state formula.

Usage: ``python bench/memory_bench.py [--preset medium] [--steps 2] [--parallel 2]``.

Each configuration is a zeroplane job (``jobs/pydoc-gpt.yaml`` with ``model.preset`` = ``--preset``, 2
workers, fp32, 2 sequences × 128 tokens per worker so that model states dominate activations, a few steps
and the final checkpoint) submitted through the SDK to a local Ray head: ZeRO stage 0, 1, 2, 3 and stage 2
with ``offload_optimizer: cpu``. Every worker's peak resident set size comes from the job's last ``step``
progress event (``peak_rss_mb``: ``getrusage`` ``ru_maxrss`` in each rank, gathered by rank 0), taken
before the final checkpoint; the ``done`` event's figure, with the checkpoint, is recorded too.

RSS also holds the Python / torch / Ray / DeepSpeed runtime, the data and the activations. A baseline job
(stage 0, ``tiny`` preset: ~0.4 M parameters, whose model states are a few MB) measures that part, and
``model-state RSS = peak RSS − baseline peak RSS``; the ratio compares it with
``zeroplane.estimate.zero_paper_bytes`` (Rajbhandari et al. 2020, fp32: 4-byte parameters and gradients,
K = 8 for stage 0, 12 for ZeRO 1-3) for that stage, N = 2 and Ψ from the job's own parameter count. With CPU
offload the optimizer states live in host memory, which on a CPU worker is the same RSS, so the formula's
device + host total is compared. Peak memory does not depend on CPU speed, so ``--parallel`` jobs run at once.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List

from _common import (at_least, bar_plot, local_head, log, machine, storage_dir, submit_zeroplane, table, wait_job,
                     write_result)

SPEC = "jobs/pydoc-gpt.yaml"
CONFIGS = [  # (label, preset or None for --preset, zero_stage, offload_optimizer)
    ("baseline (tiny, stage 0)", "tiny", 0, "none"),
    ("stage 0", None, 0, "none"),
    ("stage 1", None, 1, "none"),
    ("stage 2", None, 2, "none"),
    ("stage 3", None, 3, "none"),
    ("stage 2 + offload cpu", None, 2, "cpu"),
]


def run_one(zp, label: str, preset: str, stage: int, offload: str, steps: int, store: str) -> Dict[str, Any]:
    from zeroplane.estimate import zero_paper_bytes
    from zeroplane.sdk import parse_progress

    overrides = [f"model.preset={preset}", f"deepspeed.zero_stage={stage}", f"deepspeed.offload_optimizer={offload}",
                 f"checkpoint.storage_path={store}", f"train.max_steps={steps}", "train.warmup_steps=1",
                 "train.micro_batch_size_per_worker=2", "data.seq_len=128", "data.max_chars=200000",
                 "train.eval_batches=1", "checkpoint.every_n_steps=1000000", "train.eval_every_n_steps=1000000",
                 "failure.max_failures=0"]
    t = time.monotonic()
    job = submit_zeroplane(zp, SPEC, overrides)
    evs = parse_progress(wait_job(zp, job)["logs"])
    start = next(e for e in evs if e["event"] == "start")
    done = next(e for e in evs if e["event"] == "done")
    last = [e for e in evs if e["event"] == "step"][-1]
    psi, n = start["parameters"], start["world_size"]
    paper = zero_paper_bytes(psi, n, stage, "fp32", offload != "none")
    log(f"{label}: {psi / 1e6:.1f} M params, peak RSS {last['peak_rss_mb']} MB, with the checkpoint "
        f"{done['peak_rss_mb']} MB ({time.monotonic() - t:.0f}s)")
    return {"label": label, "preset": preset, "zero_stage": stage, "offload_optimizer": offload, "job_id": job,
            "parameters": psi, "workers": n, "peak_rss_mb": last["peak_rss_mb"],
            "peak_rss_mb_with_checkpoint": done["peak_rss_mb"],
            "paper_model_state_mb": (paper["device_bytes"] + paper["host_bytes"]) / 2**20, "paper": paper}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="medium", help="Model preset of the measured jobs (default medium, ~30 M).")
    ap.add_argument("--steps", type=at_least(1), default=2, help="Training steps per job (default 2).")
    ap.add_argument("--parallel", type=at_least(1), default=2, help="Jobs at once (2 workers each; default 2).")
    args = ap.parse_args()

    t0 = time.monotonic()
    store = storage_dir()
    try:
        with local_head(num_cpus=max(4, 2 * args.parallel)) as zp, ThreadPoolExecutor(args.parallel) as pool:
            futs = [pool.submit(run_one, zp, label, preset or args.preset, stage, off, args.steps, store)
                    for label, preset, stage, off in CONFIGS]
            runs: List[Dict[str, Any]] = [f.result() for f in futs]
    finally:
        shutil.rmtree(store, ignore_errors=True)

    base = max(runs[0]["peak_rss_mb"])
    rows = []
    for r in runs[1:]:  # max over the ranks
        measured = max(r["peak_rss_mb"]) - base
        r.update(baseline_peak_rss_mb=base, model_state_rss_mb=measured,
                 measured_over_paper=measured / r["paper_model_state_mb"])
        rows.append([r["label"], max(r["peak_rss_mb"]), measured, r["paper_model_state_mb"], r["measured_over_paper"],
                     max(r["peak_rss_mb_with_checkpoint"])])
    result = {"benchmark": "memory", "machine": machine(), "spec": SPEC, "preset": args.preset,
              "parameters": runs[1]["parameters"], "workers": runs[1]["workers"], "baseline": runs[0], "runs": runs[1:],
              "note": "peak RSS per worker (max over the ranks) minus the peak RSS of a stage-0 job of the tiny "
                      "preset (runtime, data, activations) vs the ZeRO paper's per-rank model-state bytes (fp32)",
              "total_s": time.monotonic() - t0}
    print(f"\nmemory per worker: GPT-2 preset {args.preset} ({runs[1]['parameters'] / 1e6:.1f} M params), "
          f"{runs[1]['workers']} workers, fp32; baseline peak RSS {base:.0f} MB (tiny model, stage 0) subtracted")
    print(table(["config", "peak RSS MB", "minus baseline", "ZeRO formula MB", "measured/formula",
                 "peak with ckpt MB"], rows))
    out = write_result("memory_bench", result)
    png = bar_plot("memory_bench", f"model-state memory per worker, {runs[1]['parameters'] / 1e6:.0f} M params, 2 workers",
                   [r["label"] for r in runs[1:]],
                   {"measured (peak RSS - baseline)": [r["model_state_rss_mb"] for r in runs[1:]],
                    "ZeRO paper formula": [r["paper_model_state_mb"] for r in runs[1:]]}, "MB per worker")
    print(f"wrote {out} and {png} ({result['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
