"""Run every zeroplane benchmark (``make bench``) and write ``bench/results/summary.json``, ``summary.png``
and one table; a complete run of the default set that did not fail is then published to ``bench/report/``
(tracked in git, shown by the README): every result JSON and plot plus the summary.

Usage: ``python bench/run_all.py [--only train,memory,memory_bf16,promote,serve]`` (the default set; ``control`` runs
bench/control_bench.py's own short jobs, which the default set replaces by the training benchmark's jobs).

One local Ray head (``zeroplane.cluster.start_local_head``, state in a temp ``ZEROPLANE_HOME``, free ports) is
shared by the training, memory, control and promotion benchmarks, each run as its own process; the serving
benchmark starts its own in-process Ray. The head is stopped at the end (``stop_local_head``: only the
processes it started). Every figure in the summary is a ratio against a baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

from _common import BENCH, ENV_ADDRESS, ENV_HOME, RESULTS, log, machine, number_label, table

REPORT = BENCH / "report"

BENCHES = {  # name -> (script, extra args, result files under bench/results/)
    # train_bench.py also times job control (submission -> first step, last step -> end) on its own jobs
    # and writes control_bench.json; control_bench.py alone runs separate short jobs (--only control).
    "train": ("train_bench.py", ["--warmup", "2", "--steps", "20", "--repeats", "5"],
              ["train_bench.json", "control_bench.json"]),
    "memory": ("memory_bench.py", [], ["memory_bench.json"]),
    # the ZeRO paper's own setting (16-bit weights and gradients): where stage 3 / stage 0 is judged
    "memory_bf16": ("memory_bench.py", ["--precision", "bf16", "--configs",
                                        "stage 0,stage 1,stage 2,stage 3,stage 2 + offload cpu"],
                    ["memory_bench_bf16.json"]),
    "control": ("control_bench.py", [], ["control_bench.json"]),
    "promote": ("promote_bench.py", [], ["promote_bench.json"]),
    "serve": ("serve_bench.py", ["--mix-requests", "64", "--single-requests", "20", "--repeats", "3"],
              ["serve_bench.json"]),
    "data": ("data_bench.py", [], ["data_bench.json"]),
}
DEFAULT = ["train", "memory", "memory_bf16", "promote", "serve"]


def summarize(results: Dict[str, Any]) -> List[List[Any]]:
    """``[benchmark, measure, ratio, meaning]`` rows from the individual result files."""
    rows: List[List[Any]] = []
    if (r := results.get("train")):
        q = r["ratios"]
        pairs = q.get("zeroplane_over_raw_ray_train_per_pair", [])
        sp = q.get("zeroplane_over_raw_ray_train_pair_spread")
        rows.append(["train", "tokens/s zeroplane / raw Ray Train+DeepSpeed (median of pairs, order alternating)",
                     q.get("zeroplane_over_raw_ray_train_median_pair", q["zeroplane_over_raw_ray_train"]),
                     "goal >= 0.97; " + (f"min-max {sp['min']:.3f}-{sp['max']:.3f}; " if sp else "")
                     + "pairs " + ", ".join(f"{x:.3f}" for x in pairs)])
        rows.append(["train", "tokens/s zeroplane / plain PyTorch (1 process)", q["zeroplane_over_plain_pytorch"], ""])
        z = r["rows"][0]
        rows.append(["train", "zeroplane model FLOP/s / matmul peak (all threads)", z["mfu_vs_all_thread_peak"],
                     f"{z['model_flop_per_s'] / 1e9:.1f} GFLOP/s"])
        rows.append(["train", "zeroplane model FLOP/s / 2 x 1-thread peak", z["mfu_vs_2x_one_thread_peak"], ""])
    for name in ("memory", "memory_bf16"):
        if not (r := results.get(name)):
            continue
        for x in r["runs"]:
            rows.append([name, f"{x['label']}: live tensors / ZeRO formula", x["live_over_paper"],
                         f"{x['live_tensor_max_mb']:.0f} / {x['paper_model_state_mb']:.0f} MB; (peak RSS - baseline) / "
                         f"formula {x['measured_over_paper']:.2f}"])
        if "stage 3" in r.get("over_stage0", {}):
            rows.append([name, "stage 3 / stage 0, live tensors", r["over_stage0"]["stage 3"]["live"],
                         "goal <= 0.6 (bf16)" if name == "memory_bf16" else ""])
    if (r := results.get("control")):
        q = r["ratios"]
        rows.append(["control", "submit -> first step, zeroplane / raw", q["submit_to_first_step_zeroplane_over_raw"],
                     f"{r['zeroplane']['submit_to_first_step_s']:.1f} s vs {r['raw_ray_train']['submit_to_first_step_s']:.1f} s"])
        rows.append(["control", "last step -> job ended, zeroplane / raw", q["last_step_to_end_zeroplane_over_raw"],
                     f"{r['zeroplane']['last_step_to_end_s']:.1f} s vs {r['raw_ray_train']['last_step_to_end_s']:.1f} s"])
    if (r := results.get("promote")):
        rows.append(["promote", "consolidate + verify time / copytree time",
                     r["ratios"]["consolidate_verify_over_copytree_time"],
                     f"{r['mb_per_s']['consolidate + verify']:.0f} vs {r['mb_per_s']['copytree (baseline)']:.0f} MB/s "
                     f"({r['checkpoint']['mb']:.0f} MB)"])
    if (r := results.get("serve")):
        labels = {"mix_16_over_1_req_per_s": "req/s 16 clients / 1 client (mixed requests)",
                  "streams_16_over_1_tokens_per_s": "tokens/s 16 streams / 1 stream",
                  "serve_over_in_process_p50": "p50 Serve path / same engine in process (1 client)",
                  "ttft_p95_16_over_p50_1": "TTFT p95 at 16 streams / p50 at 1"}
        engines = r["engines"]
        for key, label in labels.items():
            for engine in ("continuous", "generate"):
                if engine in engines:
                    others = [f"{e} {engines[e]['ratios'][key]:.2f}" for e in engines if e != engine]
                    spread = engines[engine].get("ratio_range", {}).get(key)
                    rows.append(["serve", f"{label}, {engine}", engines[engine]["ratios"][key],
                                 f"goal {r['goals'][key]:g}"
                                 + (f"; median of {r['repeats']} rounds, {spread[0]:.2f}-{spread[1]:.2f}" if spread else "")
                                 + (f"; {', '.join(others)}" if others else "")])
                    break
    if (r := results.get("data")):
        q = r["ratios"]
        for key, what in (("driver_peak_rss_10x_over_1x", "driver peak RSS, 10x / 1x corpus"),
                          ("worker_peak_rss_10x_over_1x", "worker peak RSS, 10x / 1x corpus"),
                          ("ray_data_over_single_process_tokens_per_s", "prep tokens/s Ray Data / one process"),
                          ("shards_over_in_memory_tokens_per_s", "train tokens/s shards / in-memory arrays"),
                          ("first_over_second_job_start", "start -> first step, first job / second (reuse)"),
                          ("first_over_second_data_ready", "start -> data ready, first job / second (reuse)")):
            if key in q:
                rows.append(["data", what, q[key], ""])
    return rows


def summary_plot(rows: List[List[Any]]) -> Path:
    """``bench/results/summary.png``: every ratio of the summary as a horizontal bar, 1.0 marked; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r[0]}: {r[1]}" for r in rows][::-1]
    values = [float(r[2]) for r in rows][::-1]
    fig, ax = plt.subplots(figsize=(10, 0.34 * len(rows) + 1.3))
    bars = ax.barh(range(len(rows)), values, color="tab:blue")
    ax.bar_label(bars, fmt=number_label, fontsize=7, padding=2)
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.set_xlim(0, max(values) * 1.12)
    ax.set_xlabel("ratio against the baseline measured in the same run (1 = equal, dashed)")
    ax.set_title(f"zeroplane benchmarks, {machine()['cpus']} CPUs, CPU only", fontsize=10)
    fig.tight_layout()
    path = RESULTS / "summary.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(DEFAULT),
                    help=f"Comma-separated subset of {','.join(BENCHES)} (default {','.join(DEFAULT)})")
    args = ap.parse_args()
    chosen = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = set(chosen) - set(BENCHES)
    if unknown:
        ap.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {', '.join(BENCHES)}")

    from zeroplane.cluster import start_local_head, stop_local_head

    t0 = time.monotonic()
    results: Dict[str, Any] = {}
    wall: Dict[str, float] = {}
    failed: Dict[str, str] = {}
    sources: Dict[str, str] = {}
    started = time.time()
    home = tempfile.mkdtemp(prefix="zp-bench-")
    os.environ["ZEROPLANE_HOME"] = home
    needs_head = any(b != "serve" for b in chosen)
    try:
        if needs_head:
            info = start_local_head(num_cpus=4)
            log(f"shared local Ray head {info.dashboard_url}")
        env = {**os.environ, ENV_HOME: home, **({ENV_ADDRESS: info.dashboard_url} if needs_head else {})}
        for name in chosen:
            script, extra, result_files = BENCHES[name]
            log(f"== {name}: python bench/{script} {' '.join(extra)}")
            t = time.monotonic()
            proc = subprocess.run([sys.executable, str(BENCH / script), *extra], env=env, cwd=BENCH.parent)
            wall[name] = round(time.monotonic() - t, 1)
            paths = [RESULTS / f for f in result_files]
            stale = [p for p in paths if not p.exists() or p.stat().st_mtime < started]
            if proc.returncode != 0 or stale:
                failed[name] = f"exit code {proc.returncode}" + (f", no fresh {[str(p) for p in stale]}" if stale else "")
                log(f"{name} FAILED ({failed[name]})")
                continue
            for p in paths:
                key = p.name.removesuffix("_bench.json")
                results[key] = json.loads(p.read_text())
                sources[key] = str(p.relative_to(BENCH.parent))
    finally:
        if needs_head:
            stop_local_head()
        shutil.rmtree(home, ignore_errors=True)

    rows = summarize(results)
    summary = {"machine": machine(), "wall_s": wall, "total_s": round(time.monotonic() - t0, 1), "failed": failed,
               "rows": [dict(zip(["benchmark", "measure", "ratio", "note"], r)) for r in rows],
               "results": sources}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2))
    if rows:
        summary_plot(rows)
    print(f"\nzeroplane benchmarks on {machine()['cpus']} CPUs (CPU only, shared): ratios against baselines "
          "measured in the same run")
    print(table(["benchmark", "measure", "ratio", "note"], rows))
    print(f"per benchmark (s): {wall}; total {summary['total_s']:.0f} s; plots in bench/results/*.png")
    if failed:
        print(f"FAILED: {failed}")
        return 1
    if set(chosen) >= set(DEFAULT):
        print(f"published to {publish(summary).relative_to(BENCH.parent)}/ (the README shows it)")
    return 0


def publish(summary: Dict[str, Any]) -> Path:
    """Copy the run's results and plots and the summary from ``bench/results/`` to ``bench/report/``
    (replacing the previous report's files of the same names); returns the report folder."""
    REPORT.mkdir(parents=True, exist_ok=True)
    names = {Path(p).name for p in summary["results"].values()}
    for name in sorted(names | {n.replace(".json", ".png") for n in names}):
        if (RESULTS / name).exists():
            shutil.copy2(RESULTS / name, REPORT / name)
    shutil.copy2(RESULTS / "summary.png", REPORT / "summary.png")
    published = {**summary, "results": {k: f"bench/report/{Path(p).name}" for k, p in summary["results"].items()}}
    (REPORT / "summary.json").write_text(json.dumps(published, indent=2))
    return REPORT


if __name__ == "__main__":
    sys.exit(main())
