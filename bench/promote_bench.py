"""Promotion: consolidation + verification of a ZeRO checkpoint against a plain copy of the same bytes.

Usage: ``python bench/promote_bench.py [--preset small] [--stage 2] [--repeats 3]``.

A zeroplane job (``jobs/pydoc-gpt.yaml``, the given preset and ZeRO stage, 2 workers, 2 steps) writes one
checkpoint to a temp storage folder on a local Ray head. Then, in this process, each ``--repeats`` + 1
times: ``shutil.copytree`` of the checkpoint folder (the baseline: moving the same bytes), then
``zeroplane.promote.consolidate`` (DeepSpeed ``zero_to_fp32`` → ``model.safetensors`` + config + tokenizer)
and ``zeroplane.promote.verify`` (load alone, keys, tied weights, probe logits), the SHA-256 check of the
checkpoint's files against its marker (``zeroplane.checkpoints.check_local_copy``, part of every promotion
and resume), and the whole
``promote_checkpoint`` without deployment (download + consolidate + verify + register). The top-level
libraries are imported before timing; round 0 is reported apart as "cold" (the first promotion in a process,
as ``zeroplane promote`` runs it, still pays lazy imports inside transformers and DeepSpeed), the
median of the other rounds as "warm". The page cache is warm for every reader alike. MB/s is checkpoint
bytes / seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from _common import (at_least, bar_plot, local_head, log, machine, storage_dir, submit_zeroplane, table, wait_job,
                     write_result)

SPEC = "jobs/pydoc-gpt.yaml"


def timed(fn) -> float:
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        fn()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", help="Model preset (default small: the demo model).")
    ap.add_argument("--stage", type=int, choices=[0, 1, 2, 3], default=2, help="ZeRO stage of the checkpoint (default 2).")
    ap.add_argument("--repeats", type=at_least(1), default=3, help="Warm timed rounds after the cold one; medians count (default 3).")
    args = ap.parse_args()

    from zeroplane.checkpoints import check_local_copy, latest_complete
    from zeroplane.promote import consolidate, promote_checkpoint, verify
    from zeroplane.storage import Storage

    t0 = time.monotonic()
    store = storage_dir()
    work = Path(tempfile.mkdtemp(prefix="zp-bench-promote-"))
    try:
        with local_head() as zp:
            log(f"zeroplane job writing one checkpoint (preset {args.preset}, ZeRO-{args.stage})")
            job = submit_zeroplane(zp, SPEC, [f"checkpoint.storage_path={store}", f"model.preset={args.preset}",
                                              f"deepspeed.zero_stage={args.stage}", "train.max_steps=2",
                                              "train.warmup_steps=1", "train.eval_batches=1", "failure.max_failures=0"])
            wait_job(zp, job)
        storage = Storage.from_uri(store)
        ckpt = latest_complete(storage, job)
        src = Path(ckpt.path)
        files = [p for p in src.rglob("*") if p.is_file()]
        nbytes = sum(p.stat().st_size for p in files)
        import deepspeed.utils.zero_to_fp32  # noqa: F401  (imports outside the timings)
        import transformers  # noqa: F401

        times: Dict[str, List[float]] = {"copytree": [], "sha-256 check": [], "consolidate": [], "verify": [],
                                         "promote (no deploy)": []}
        for i in range(args.repeats + 1):  # round 0: cold
            log(f"round {i}/{args.repeats}" + (" (cold: first use in this process)" if i == 0 else ""))
            dst = work / f"copy{i}"
            times["copytree"].append(timed(lambda: shutil.copytree(src, dst)))
            times["sha-256 check"].append(timed(lambda: check_local_copy(storage, ckpt.path, str(dst))))
            out = work / f"model{i}"
            times["consolidate"].append(timed(lambda: consolidate(src, out)))
            ok = {}
            times["verify"].append(timed(lambda: ok.update(verify(out, src))))
            assert ok["ok"], ok
            times["promote (no deploy)"].append(timed(lambda: promote_checkpoint(storage, str(src), f"bench{i}")))
            shutil.rmtree(dst)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    cold = {k: v[0] for k, v in times.items() if k != "promote (no deploy)"}
    mb = nbytes / 2**20

    def rows_of(t: Dict[str, float]) -> List[List]:
        cv = t["consolidate"] + t["verify"]
        return [["copytree (baseline)", t["copytree"], mb / t["copytree"], 1.0],
                ["sha-256 check", t["sha-256 check"], mb / t["sha-256 check"], t["sha-256 check"] / t["copytree"]],
                ["consolidate", t["consolidate"], mb / t["consolidate"], t["consolidate"] / t["copytree"]],
                ["verify", t["verify"], mb / t["verify"], t["verify"] / t["copytree"]],
                ["consolidate + verify", cv, mb / cv, cv / t["copytree"]],
                ["promote (no deploy)", t["promote (no deploy)"], mb / t["promote (no deploy)"],
                 t["promote (no deploy)"] / t["copytree"]]]

    rows = rows_of(med)
    cold_rows = rows_of({**cold, "promote (no deploy)": med["promote (no deploy)"]})[:5]  # round 0's promote
    # runs after its consolidate, so it is not cold: left out
    cv = med["consolidate"] + med["verify"]
    result = {"benchmark": "promote", "machine": machine(), "spec": SPEC, "preset": args.preset, "zero_stage": args.stage,
              "checkpoint": {"bytes": nbytes, "files": len(files), "mb": mb}, "times_s": times, "median_s": med,
              "cold_s": cold, "mb_per_s": {r[0]: r[2] for r in rows}, "cold_mb_per_s": {r[0]: r[2] for r in cold_rows},
              "ratios": {"consolidate_verify_over_copytree_time": cv / med["copytree"],
                         "cold_consolidate_verify_over_copytree_time": cold_rows[4][3],
                         "sha256_check_over_copytree_time": med["sha-256 check"] / med["copytree"],
                         "copytree_mb_per_s_over_consolidate_verify_mb_per_s": (mb / med["copytree"]) / (mb / cv)},
              "total_s": time.monotonic() - t0}
    print(f"\npromotion: {mb:.1f} MB ZeRO-{args.stage} checkpoint ({len(files)} files, preset {args.preset}), "
          f"median of {args.repeats} warm rounds")
    print(table(["step", "seconds", "MB/s", "time vs copytree"], rows))
    print("cold (round 0: the first promotion in a process, as `zeroplane promote` runs; lazy imports inside "
          "transformers / DeepSpeed, first torch.load):")
    print(table(["step", "seconds", "MB/s", "time vs copytree"], cold_rows))
    out = write_result("promote_bench", result)
    png = bar_plot("promote_bench", f"promotion of a {mb:.0f} MB checkpoint: MB/s", [r[0] for r in cold_rows],
                   {"warm (median)": [r[2] for r in rows[:5]], "cold (first in process)": [r[2] for r in cold_rows]},
                   "MB/s")
    print(f"wrote {out} and {png} ({result['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
