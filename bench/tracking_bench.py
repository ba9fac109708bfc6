"""Tracking overhead: training tokens/s of the demo job with all tracking on (TensorBoard event files + an
MLflow run on a local ``mlflow server``, every step logged) against the same job with tracking off, in one run.

Jobs run in interleaved off/on pairs on one local Ray head (a load change on this shared machine hits both
alike); throughput is the median step time between the per-step progress events (``t``, rank 0's clock
when the step's line is printed, so rank 0's tracking work after a step counts), steps ``warmup+1 …
warmup+steps``, the final evaluation and checkpoint outside the window (as ``train_bench.py``). The ratio
is the fastest "on" run over the fastest "off" run (goal >= 0.99); each pair's own ratio is printed too.

Also measured in this process: the time of one rank-0 ``Tracker.on_log`` call (world 1: the writes and the
queueing, without the memory all-gather) over many calls.

    python bench/tracking_bench.py [--warmup 3] [--steps 30] [--repeats 2]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (REPO, at_least, local_head, log, machine, storage_dir, table, window_rate,  # noqa: E402
                     write_result, zeroplane_job)

SPEC = "jobs/pydoc-gpt.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow(folder: str) -> tuple:
    """``mlflow server`` (SQLite backend, local artifacts) on a free loopback port; returns (process, url).

    Raises:
        RuntimeError: the server did not answer /health within 180 s.
    """
    port = _free_port()
    log_file = open(Path(folder) / "mlflow.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
                             "--artifacts-destination", f"{folder}/artifacts", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"mlflow server not up at {url} after 180 s")


def on_log_cost(calls: int = 2000) -> Dict[str, float]:
    """Seconds per rank-0 ``Tracker.on_log`` (world 1) with event files on, MLflow off, over ``calls`` calls."""
    from zeroplane.runtime.train.tracking import Tracker
    from zeroplane.spec import load_spec
    from zeroplane.storage import Storage

    class _Engine:
        def get_global_grad_norm(self):
            return 0.5

    d = tempfile.mkdtemp(prefix="zp-bench-tb-")
    try:
        spec = load_spec(REPO / SPEC, [f"checkpoint.storage_path={d}", "tracking.mlflow_uri=null"])
        tr = Tracker.open(spec, "bench-tracking", Storage.for_checkpoint_spec(spec.checkpoint), 0, 1, 0, 4096,
                          100_000, {}, d)
        eng = _Engine()
        t = time.perf_counter()
        for step in range(1, calls + 1):
            tr.on_log(step, {"loss": 5.0, "lr": 1e-3, "tokens_per_s": 3000.0, "epoch": 0.1}, eng)
        per = (time.perf_counter() - t) / calls
        tr.close()
        return {"calls": calls, "s_per_call": per}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warmup", type=at_least(1), default=3, help="Steps excluded at the start (default 3).")
    ap.add_argument("--steps", type=at_least(2), default=30, help="Timed steps (default 30).")
    ap.add_argument("--repeats", type=at_least(1), default=2, help="off/on job pairs, interleaved (default 2).")
    args = ap.parse_args()
    t0 = time.monotonic()
    w, s = args.warmup, args.steps
    store, mlflow_dir = storage_dir(), tempfile.mkdtemp(prefix="zp-bench-mlflow-")
    base = [f"checkpoint.storage_path={store}", f"train.max_steps={w + s + 1}", "checkpoint.every_n_steps=1000000",
            "train.eval_every_n_steps=1000000", "failure.max_failures=0", f"train.warmup_steps={min(20, w + s)}",
            "train.log_every_n_steps=1"]
    from zeroplane.spec import load_spec

    spec = load_spec(REPO / SPEC, base)
    tokens_per_step = spec.scaling.num_workers * spec.train.micro_batch_size_per_worker * spec.data.seq_len
    log("rank-0 Tracker.on_log cost in this process")
    micro = on_log_cost()
    mlflow_proc, url = start_mlflow(mlflow_dir)
    log(f"mlflow server at {url}")
    variants = {"off": ["tracking.tensorboard=false", "tracking.mlflow_uri=null"],
                "on": ["tracking.tensorboard=true", f"tracking.mlflow_uri={url}"]}
    runs: Dict[str, List[Dict[str, Any]]] = {k: [] for k in variants}
    try:
        with local_head() as zp:
            for rep in range(args.repeats):
                for name, extra in variants.items():
                    log(f"tracking {name} ({w + s + 1} steps) [{rep + 1}/{args.repeats}]")
                    j = zeroplane_job(zp, SPEC, base + extra)
                    runs[name].append({"job_id": j["job_id"], **window_rate(j["step_times"], w, w + s, tokens_per_step)})
                log(f"pair {rep + 1}: off {runs['off'][-1]['tokens_per_s']:.0f}, on {runs['on'][-1]['tokens_per_s']:.0f} tokens/s")
    finally:
        mlflow_proc.terminate()
        mlflow_proc.wait(timeout=30)
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(mlflow_dir, ignore_errors=True)
    best = {k: max(v, key=lambda r: r["tokens_per_s"]) for k, v in runs.items()}
    ratio = best["on"]["tokens_per_s"] / best["off"]["tokens_per_s"]
    pairs = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs["on"], runs["off"])]
    step_s = best["off"]["s_per_step"]
    result = {"benchmark": "tracking", "machine": machine(), "spec": SPEC, "overrides": base, "variants": variants,
              "window": {"warmup_steps": w, "timed_steps": s, "tokens_per_step": tokens_per_step}, "runs": runs,
              "ratios": {"tracking_on_over_off": ratio, "per_pair": pairs, "median_pair": statistics.median(pairs)},
              "on_log": {**micro, "fraction_of_a_step": micro["s_per_call"] / step_s},
              "goal": {"tracking_on_over_off": 0.99}, "total_s": time.monotonic() - t0}
    print(table(["tracking", "tokens/s (fastest)", "s/step (median)"],
                [[k, best[k]["tokens_per_s"], best[k]["s_per_step"]] for k in ("off", "on")]))
    print(f"tokens/s tracking on / off = {ratio:.3f} (goal >= 0.99; per interleaved pair: "
          f"{', '.join(f'{x:.3f}' for x in pairs)}); one rank-0 on_log call {micro['s_per_call'] * 1e3:.3f} ms = "
          f"{result['on_log']['fraction_of_a_step'] * 100:.3f} % of a step")
    print(f"wrote {write_result('tracking_bench', result)}; {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
