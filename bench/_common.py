"""Shared pieces of the zeroplane benchmarks: a local Ray head, job submission and events, the machine's
matmul peak, tables, JSON results and plots under ``bench/results/``.

Every benchmark compares against a baseline measured in the same run, on the same head: absolute times on a
shared 2-core machine mean little, ratios do.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform as _platform  # stdlib
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
RAW_SCRIPT = BENCH / "raw_ray_train.py"
#: run_all.py starts one head for every benchmark and passes it on through these two variables.
ENV_ADDRESS, ENV_HOME = "ZEROPLANE_BENCH_ADDRESS", "ZEROPLANE_BENCH_HOME"


def at_least(low: int):
    """An argparse ``type``: an int no smaller than ``low`` (else a usage error naming the bound)."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum {low}")
        return value

    return parse


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def local_head(num_cpus: int = 4) -> Iterator[Any]:
    """Yield a ``zeroplane.sdk.Client`` on a local Ray head.

    The head named by ``$ZEROPLANE_BENCH_ADDRESS`` (with its ``$ZEROPLANE_BENCH_HOME``) when run_all.py
    started one, else a fresh head (``zeroplane.cluster.start_local_head``, free ports, state in a temp
    ``ZEROPLANE_HOME``) that is stopped (``stop_local_head``: only its own processes) at the end.
    """
    from zeroplane.cluster import start_local_head, stop_local_head
    from zeroplane.sdk import Client

    if os.environ.get(ENV_ADDRESS):
        os.environ["ZEROPLANE_HOME"] = os.environ[ENV_HOME]
        yield Client(address=os.environ[ENV_ADDRESS])
        return
    home = tempfile.mkdtemp(prefix="zp-bench-")
    os.environ["ZEROPLANE_HOME"] = home
    t = time.perf_counter()
    info = start_local_head(num_cpus=num_cpus)
    log(f"local Ray head {info.dashboard_url} up in {time.perf_counter() - t:.0f}s")
    try:
        yield Client(address=info.dashboard_url)
    finally:
        stop_local_head()
        shutil.rmtree(home, ignore_errors=True)


def storage_dir() -> str:
    """A fresh temp folder for checkpoints (removed by the caller with ``shutil.rmtree``)."""
    return tempfile.mkdtemp(prefix="zp-bench-store-")


def submit_zeroplane(zp, spec_file: str, overrides: Sequence[str]) -> str:
    """``zeroplane train submit SPEC --set …`` through the SDK; returns the job id."""
    from zeroplane.spec import load_spec

    return zp.submit(load_spec(REPO / spec_file, list(overrides))).job_id


def raw_config(spec, steps: int, vocab: int, storage_path: str) -> Dict[str, Any]:
    """The ``$RAW_TRAIN_CONFIG`` of raw_ray_train.py for the same model, batch and DeepSpeed config as ``spec``."""
    from zeroplane.spec.deepspeed import build_deepspeed_config
    from zeroplane.spec.model import PRESETS

    sizes = {**PRESETS[spec.model.preset], **spec.model.config}
    return {"ds_config": build_deepspeed_config(spec), "seq_len": spec.data.seq_len, "steps": steps,
            "num_workers": spec.scaling.num_workers, "seed": spec.train.seed, "storage_path": storage_path,
            "model": {**sizes, "vocab_size": vocab, "n_positions": spec.data.seq_len, "bos_token_id": 0, "eos_token_id": 0,
                      "tie_word_embeddings": spec.model.tie_word_embeddings}}


def vocab_of(spec, parameters: int) -> int:
    """The vocabulary a zeroplane GPT-2 job really got (its trained BPE may stop below ``vocab_size``), from
    the job's parameter count: Ψ is linear in the vocabulary with slope ``n_embd`` (tied head)."""
    from zeroplane.estimate import gpt2_parameters
    from zeroplane.spec.model import PRESETS

    d = {**PRESETS[spec.model.preset], **spec.model.config}["n_embd"]
    at_nominal, _ = gpt2_parameters(spec)
    return spec.tokenizer.train_bpe.vocab_size + (parameters - at_nominal) // (d * (1 if spec.model.tie_word_embeddings else 2))


def submit_raw(zp, cfg: Dict[str, Any]) -> str:
    """``ray job submit`` (``JobSubmissionClient.submit_job``) of raw_ray_train.py; returns the job id."""
    return zp.jobs.client.submit_job(entrypoint=f"{sys.executable} {RAW_SCRIPT}",
                                     runtime_env={"env_vars": {"RAW_TRAIN_CONFIG": json.dumps(cfg),
                                                               "PYTHONUNBUFFERED": "1"}})


def raw_events(log_text: str) -> List[Dict[str, Any]]:
    """``RAW_STEP`` events of raw_ray_train.py, in order, deduplicated by step."""
    out: Dict[int, Dict[str, Any]] = {}
    for line in log_text.splitlines():
        i = line.find("RAW_STEP ")
        if i >= 0:
            with contextlib.suppress(json.JSONDecodeError):
                ev = json.loads(line[i + 9:])
                out.setdefault(ev["step"], ev)
    return [out[k] for k in sorted(out)]


def wait_job(zp, job_id: str, timeout_s: float = 900, poll_s: float = 0.5) -> Dict[str, Any]:
    """Wait for a Ray job to end; returns ``{"status", "logs", "start_time", "end_time"}`` (Ray's own
    timestamps, Unix seconds). Polls the status alone, unlike ``Client.wait``, which fetches and parses the
    whole log at every poll: that would take CPU from the job being timed on this 2-core machine.

    Raises:
        RuntimeError: the job did not succeed, or ``timeout_s`` passed (the job is stopped).
    """
    client = zp.jobs.client
    deadline = time.monotonic() + timeout_s
    while True:
        info = client.get_job_info(job_id)
        if str(info.status) in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            raise RuntimeError(f"job {job_id} still {info.status} after {timeout_s:.0f}s (stopped)")
        time.sleep(poll_s)
    logs = client.get_job_logs(job_id)
    if str(info.status) != "SUCCEEDED":
        raise RuntimeError(f"job {job_id} {info.status}: {info.message}\n{logs[-3000:]}")
    return {"status": str(info.status), "logs": logs, "start_time": info.start_time / 1e3,
            "end_time": info.end_time / 1e3}


def _deltas(t0: float, marks: Dict[str, float]) -> Dict[str, float]:
    """Seconds of each phase: from the previous mark (the first from ``t0``) to this one."""
    out, prev = {}, t0
    for k, v in marks.items():
        out[k] = round(v - prev, 3)
        prev = v
    return out


def zeroplane_job(zp, spec_file: str, overrides: Sequence[str]) -> Dict[str, Any]:
    """Submit a zeroplane job through the SDK, wait for it, and time it from its progress events.

    Returns ``{"job_id", "parameters", "data" (the driver's data line), "step_times": {step: t}, "submit_to_first_step_s",
    "last_step_to_end_s", "breakdown_to_first_step_s", "breakdown_after_last_step_s"}``: ``t`` are Unix
    seconds (rank 0's clock, the end of each step); submission is timed here around ``Client.submit``
    (storage preflight + ``JobSubmissionClient.submit_job`` with the package as ``py_modules``); the end is
    Ray's own ``end_time`` of the job.

    Raises:
        RuntimeError: the job did not succeed (see :func:`wait_job`).
    """
    from zeroplane.sdk import parse_progress

    t_submit = time.time()
    job = submit_zeroplane(zp, spec_file, overrides)
    t_submitted = time.time()
    done = wait_job(zp, job)
    evs = parse_progress(done["logs"])
    first = lambda kind: next(e for e in evs if e["event"] == kind)  # noqa: E731
    steps = [e for e in evs if e["event"] == "step"]
    marks = {"submit call": t_submitted, "driver, data, workers up, DeepSpeed initialised": first("start")["t"]}
    if any(e["event"] == "eval" for e in evs):
        marks["step-0 evaluation"] = first("eval")["t"]
    marks["first step"] = steps[0]["t"]
    tail = {"last step": steps[-1]["t"], "checkpoint written": first("checkpoint")["t"],
            "done event": first("done")["t"], "job ended (Ray)": done["end_time"]}
    data_line = next((ln for ln in done["logs"].splitlines() if "[zeroplane] data:" in ln), "")
    return {"job_id": job, "parameters": first("start")["parameters"], "data": data_line.strip(),
            "step_times": {e["step"]: e["t"] for e in steps},
            "submit_to_first_step_s": steps[0]["t"] - t_submit, "last_step_to_end_s": done["end_time"] - steps[-1]["t"],
            "breakdown_to_first_step_s": _deltas(t_submit, marks),
            "breakdown_after_last_step_s": _deltas(steps[-1]["t"], tail)}


def raw_job(zp, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Submit raw_ray_train.py with ``$RAW_TRAIN_CONFIG`` = ``cfg``, wait, and time it like
    :func:`zeroplane_job` (the same keys but ``data``; its step 0 line is printed after ``deepspeed.initialize``)."""
    t_submit = time.time()
    job = submit_raw(zp, cfg)
    t_submitted = time.time()
    done = wait_job(zp, job)
    evs = raw_events(done["logs"])
    marks = {"submit call": t_submitted, "driver, workers up, DeepSpeed initialised": evs[0]["t"],
             "first step": evs[1]["t"]}
    return {"job_id": job, "parameters": evs[0]["parameters"], "step_times": {e["step"]: e["t"] for e in evs[1:]},
            "submit_to_first_step_s": evs[1]["t"] - t_submit, "last_step_to_end_s": done["end_time"] - evs[-1]["t"],
            "breakdown_to_first_step_s": _deltas(t_submit, marks),
            "breakdown_after_last_step_s": _deltas(evs[-1]["t"], {"job ended (Ray)": done["end_time"]})}


def warm_submission_imports() -> None:
    """Import what both kinds of submission use (``ray.job_submission``, the SDK and its Ray Jobs backend,
    the DeepSpeed config builder), so that the first timed submission of either kind does not pay for it."""
    import ray.job_submission  # noqa: F401
    import zeroplane.backends.rayjobs  # noqa: F401
    import zeroplane.sdk  # noqa: F401
    from zeroplane.spec.deepspeed import build_deepspeed_config  # noqa: F401


def window_rate(step_times: Dict[int, float], first: int, last: int, tokens_per_step: int) -> Dict[str, float]:
    """Throughput over the steps ``first+1 … last`` from the times their step events were printed (each
    after its step had ended).

    Returns ``tokens_per_s`` (from the median step time: one slow step when another process takes the CPU
    counts little), ``tokens_per_s_mean`` (whole window), ``s_per_step`` (median), ``seconds``, ``steps``.
    """
    import statistics

    durations = [step_times[k] - step_times[k - 1] for k in range(first + 1, last + 1)]
    dt = step_times[last] - step_times[first]
    med = statistics.median(durations)
    return {"steps": last - first, "seconds": dt, "s_per_step": med, "tokens_per_s": tokens_per_step / med,
            "tokens_per_s_mean": (last - first) * tokens_per_step / dt}


def matmul_peak(threads: int, n: int = 1024, seconds: float = 3.0) -> float:
    """Dense fp32 ``torch.matmul`` FLOP/s of ``n×n`` matrices on ``threads`` threads (best of 5 timed
    rounds of ~``seconds``/5 each, after a warm-up); 2n³ FLOP per product."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(3):
            torch.matmul(a, b)
        t = time.perf_counter()
        torch.matmul(a, b)
        reps = max(1, int(seconds / 5 / max(time.perf_counter() - t, 1e-6)))
        best = 0.0
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(reps):
                torch.matmul(a, b)
            best = max(best, reps * 2 * n**3 / (time.perf_counter() - t))
        return best
    finally:
        torch.set_num_threads(before)


def machine() -> Dict[str, Any]:
    import importlib.metadata

    import ray
    import torch

    return {"cpus": os.cpu_count(), "platform": _platform.platform(), "python": _platform.python_version(),
            "torch": torch.__version__, "ray": ray.__version__, "deepspeed": importlib.metadata.version("deepspeed"),
            "transformers": importlib.metadata.version("transformers"),
            "note": "CPU only; other work may share the machine"}


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table (numbers right-aligned, floats with 3 significant decimals)."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
        return str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def write_result(name: str, result: Dict[str, Any]) -> Path:
    """Write ``bench/results/<name>.json`` (overwritten by each run); returns the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    return path


def number_label(v: float) -> str:
    """A bar label: thousands separated from 100 up, else 3 significant digits."""
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def bar_plot(name: str, title: str, labels: Sequence[str], series: Dict[str, Sequence[float]], ylabel: str,
             hline: Optional[float] = None) -> Path:
    """A grouped bar chart ``bench/results/<name>.png`` (matplotlib, Agg backend); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(labels) * max(1, len(series))), 3.6))
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        bars = ax.bar(xs, values, width, label=label)
        ax.bar_label(bars, fmt=number_label, fontsize=7)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
