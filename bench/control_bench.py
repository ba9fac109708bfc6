"""Job control overhead: submission to the first training step, and the last step to the job's end, for a
zeroplane job against ``ray job submit`` of the hand-written Ray Train + DeepSpeed script.

Usage: ``python bench/control_bench.py [--steps 3] [--repeats 2]``. ``make bench`` (run_all.py) does not run
this script: bench/train_bench.py times the same two intervals on its own interleaved zeroplane / raw jobs
and writes this benchmark's result with :func:`report`.

Both jobs train the demo model (``jobs/pydoc-gpt.yaml`` sizes, ZeRO-2, 2 workers) for ``--steps`` steps
on the same local Ray head, interleaved (zeroplane, raw, zeroplane, raw, …), medians reported. Clocks:
submission is timed in this process around the SDK's ``submit`` (storage preflight +
``JobSubmissionClient.submit_job`` with the zeroplane package as ``py_modules``) or the plain
``submit_job`` of bench/raw_ray_train.py, both after the imports they share; the first step is the ``t`` of
the first ``step`` event (the end of step 1, rank 0's clock; same machine); the job's end is Ray's own
``end_time`` of the job.

zeroplane does more before step 1 than the raw script: the package upload, text → tokenizer (cached in
storage after the first job, see ``cached_bpe_tokenizer``) → token arrays in the driver, and the step-0
validation loss; and after the last step: the final evaluation, checkpoint (every rank's shards +
completion marker) and the result file. The breakdown from its progress events shows where the time goes.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from typing import Any, Dict, List

from _common import (REPO, at_least, bar_plot, local_head, log, machine, raw_config, raw_job, storage_dir, table, vocab_of,
                     warm_submission_imports, write_result, zeroplane_job)

SPEC = "jobs/pydoc-gpt.yaml"


def report(runs: Dict[str, List[Dict[str, Any]]], source: str, t0: float) -> Dict[str, Any]:
    """Print the table, write ``bench/results/control_bench.json`` and ``.png``; returns the result.

    Args:
        runs: ``{"zeroplane": [job timings], "raw Ray Train": [job timings]}`` as returned by
            ``_common.zeroplane_job`` / ``raw_job`` (at least one each).
        source: Which jobs these are (recorded in the result and printed).
        t0: ``time.monotonic()`` at the benchmark's start.
    """
    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    z1, r1 = med("zeroplane", "submit_to_first_step_s"), med("raw Ray Train", "submit_to_first_step_s")
    z2, r2 = med("zeroplane", "last_step_to_end_s"), med("raw Ray Train", "last_step_to_end_s")
    slim = {k: [{kk: vv for kk, vv in r.items() if kk != "step_times"} for r in v] for k, v in runs.items()}
    result = {"benchmark": "control", "machine": machine(), "spec": SPEC, "source": source, "runs": slim,
              "zeroplane": {"submit_to_first_step_s": z1, "last_step_to_end_s": z2},
              "raw_ray_train": {"submit_to_first_step_s": r1, "last_step_to_end_s": r2},
              "ratios": {"submit_to_first_step_zeroplane_over_raw": z1 / r1,
                         "last_step_to_end_zeroplane_over_raw": z2 / r2},
              "total_s": time.monotonic() - t0}
    n = len(runs["zeroplane"])
    print(f"\njob control overhead: demo model, ZeRO-2, 2 workers; {source}; median of {n}")
    print(table(["phase", "zeroplane s", "raw Ray Train s", "ratio"],
                [["submit -> first step", z1, r1, z1 / r1], ["last step -> job ended", z2, r2, z2 / r2]]))
    for name, rs in runs.items():
        for r in rs:
            print(f"{name} breakdown (s): {r['breakdown_to_first_step_s']} | {r['breakdown_after_last_step_s']}")
    out = write_result("control_bench", result)
    png = bar_plot("control_bench", "job control overhead (seconds, median)", ["submit -> first step", "last step -> ended"],
                   {"zeroplane": [z1, z2], "raw Ray Train": [r1, r2]}, "seconds")
    print(f"wrote {out} and {png}")
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=at_least(1), default=3, help="Training steps of each job (default 3).")
    ap.add_argument("--repeats", type=at_least(1), default=2, help="zeroplane/raw pairs, interleaved; medians count (default 2).")
    args = ap.parse_args()

    from zeroplane.spec import load_spec

    t0 = time.monotonic()
    store = storage_dir()
    overrides = [f"checkpoint.storage_path={store}", f"train.max_steps={args.steps}", "train.warmup_steps=1",
                 "checkpoint.every_n_steps=1000000", "train.eval_every_n_steps=1000000", "failure.max_failures=0"]
    spec = load_spec(REPO / SPEC, overrides)
    warm_submission_imports()
    runs: Dict[str, list] = {"zeroplane": [], "raw Ray Train": []}
    try:
        with local_head() as zp:
            for rep in range(args.repeats):
                log(f"zeroplane job ({args.steps} steps) [{rep + 1}/{args.repeats}]")
                z = zeroplane_job(zp, SPEC, overrides)
                runs["zeroplane"].append(z)
                log(f"raw Ray Train job ({args.steps} steps) [{rep + 1}/{args.repeats}]")
                cfg = raw_config(spec, args.steps, vocab_of(spec, z["parameters"]), store)
                runs["raw Ray Train"].append(raw_job(zp, cfg))
    finally:
        shutil.rmtree(store, ignore_errors=True)
    report(runs, f"{args.steps}-step jobs of this script", t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
