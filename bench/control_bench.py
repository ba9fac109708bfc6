"""Job control overhead: submission to the first training step, and the last step to the job's end, for a
zeroplane job against ``ray job submit`` of the hand-written Ray Train + DeepSpeed script.

Usage: ``python bench/control_bench.py [--steps 3] [--repeats 1]``.

Both jobs train the demo model (``jobs/pydoc-gpt.yaml`` sizes, ZeRO-2, 2 workers) for ``--steps`` steps
on the same local Ray head. Clocks: submission is timed in this process around the SDK's ``submit`` (storage
preflight + ``JobSubmissionClient.submit_job`` with the zeroplane package as ``py_modules``) or the plain
``submit_job`` of bench/raw_ray_train.py; the first step is the ``t`` of the first ``step`` event (the
end of step 1, rank 0's clock; same machine); the job's end is Ray's own ``end_time`` of the job.

zeroplane does more before step 1 than the raw script: the package upload, text → BPE tokenizer →
token arrays in the driver, and the step-0 validation loss; and after the last step: the final
evaluation, checkpoint (every rank's shards + completion marker) and the result file. The breakdown
from its progress events shows where the time goes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from typing import Any, Dict

from _common import (REPO, bar_plot, local_head, log, machine, raw_config, raw_events, storage_dir, submit_raw,
                     submit_zeroplane, table, vocab_of, wait_job, write_result)

SPEC = "jobs/pydoc-gpt.yaml"


def zeroplane_run(zp, overrides) -> Dict[str, Any]:
    from zeroplane.sdk import parse_progress

    t_submit = time.time()
    job = submit_zeroplane(zp, SPEC, overrides)
    t_submitted = time.time()
    done = wait_job(zp, job)
    evs = parse_progress(done["logs"])
    first = lambda kind: next(e for e in evs if e["event"] == kind)  # noqa: E731
    steps = [e for e in evs if e["event"] == "step"]
    marks = {"submit call": t_submitted, "driver, data, workers up, DeepSpeed initialised": first("start")["t"],
             "step-0 evaluation": first("eval")["t"], "first step": steps[0]["t"]}
    tail = {"last step": steps[-1]["t"], "checkpoint written": first("checkpoint")["t"],
            "done event": first("done")["t"], "job ended (Ray)": done["end_time"]}
    return {"job_id": job, "parameters": first("start")["parameters"],
            "submit_to_first_step_s": steps[0]["t"] - t_submit,
            "last_step_to_end_s": done["end_time"] - steps[-1]["t"],
            "breakdown_to_first_step_s": _deltas(t_submit, marks), "breakdown_after_last_step_s": _deltas(steps[-1]["t"], tail)}


def raw_run(zp, cfg) -> Dict[str, Any]:
    t_submit = time.time()
    job = submit_raw(zp, cfg)
    t_submitted = time.time()
    done = wait_job(zp, job)
    evs = raw_events(done["logs"])
    marks = {"submit call": t_submitted, "driver, workers up, DeepSpeed initialised": evs[0]["t"],
             "first step": evs[1]["t"]}
    return {"job_id": job, "submit_to_first_step_s": evs[1]["t"] - t_submit,
            "last_step_to_end_s": done["end_time"] - evs[-1]["t"],
            "breakdown_to_first_step_s": _deltas(t_submit, marks),
            "breakdown_after_last_step_s": _deltas(evs[-1]["t"], {"job ended (Ray)": done["end_time"]})}


def _deltas(t0: float, marks: Dict[str, float]) -> Dict[str, float]:
    """Seconds of each phase: from the previous mark (the first from ``t0``) to this one."""
    out, prev = {}, t0
    for k, v in marks.items():
        out[k] = round(v - prev, 3)
        prev = v
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="Training steps of each job (default 3).")
    ap.add_argument("--repeats", type=int, default=1, help="zeroplane/raw pairs, interleaved; medians count.")
    args = ap.parse_args()

    from zeroplane.spec import load_spec

    t0 = time.monotonic()
    store = storage_dir()
    overrides = [f"checkpoint.storage_path={store}", f"train.max_steps={args.steps}", "train.warmup_steps=1",
                 "checkpoint.every_n_steps=1000000", "train.eval_every_n_steps=1000000", "failure.max_failures=0"]
    spec = load_spec(REPO / SPEC, overrides)
    runs: Dict[str, list] = {"zeroplane": [], "raw Ray Train": []}
    try:
        with local_head() as zp:
            for rep in range(args.repeats):
                log(f"zeroplane job ({args.steps} steps) [{rep + 1}/{args.repeats}]")
                z = zeroplane_run(zp, overrides)
                runs["zeroplane"].append(z)
                log(f"raw Ray Train job ({args.steps} steps) [{rep + 1}/{args.repeats}]")
                vocab = vocab_of(spec, z["parameters"])
                runs["raw Ray Train"].append(raw_run(zp, raw_config(spec, args.steps, vocab, store)))
    finally:
        shutil.rmtree(store, ignore_errors=True)

    def med(name, key):
        vals = sorted(r[key] for r in runs[name])
        return vals[len(vals) // 2]

    z1, r1 = med("zeroplane", "submit_to_first_step_s"), med("raw Ray Train", "submit_to_first_step_s")
    z2, r2 = med("zeroplane", "last_step_to_end_s"), med("raw Ray Train", "last_step_to_end_s")
    result = {"benchmark": "control", "machine": machine(), "spec": SPEC, "overrides": overrides, "runs": runs,
              "zeroplane": {"submit_to_first_step_s": z1, "last_step_to_end_s": z2},
              "raw_ray_train": {"submit_to_first_step_s": r1, "last_step_to_end_s": r2},
              "ratios": {"submit_to_first_step_zeroplane_over_raw": z1 / r1,
                         "last_step_to_end_zeroplane_over_raw": z2 / r2},
              "total_s": time.monotonic() - t0}
    print(f"\njob control overhead: demo model, ZeRO-2, 2 workers, {args.steps} steps, median of {args.repeats}")
    print(table(["phase", "zeroplane s", "raw Ray Train s", "ratio"],
                [["submit -> first step", z1, r1, z1 / r1], ["last step -> job ended", z2, r2, z2 / r2]]))
    print("zeroplane breakdown (s):", runs["zeroplane"][0]["breakdown_to_first_step_s"],
          runs["zeroplane"][0]["breakdown_after_last_step_s"])
    print("raw breakdown (s):", runs["raw Ray Train"][0]["breakdown_to_first_step_s"])
    out = write_result("control_bench", result)
    png = bar_plot("control_bench", "job control overhead (seconds)", ["submit -> first step", "last step -> ended"],
                   {"zeroplane": [z1, z2], "raw Ray Train": [r1, r2]}, "seconds")
    print(f"wrote {out} and {png} ({result['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
