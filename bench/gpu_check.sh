#!/usr/bin/env bash
# GPU check on a machine with one NVIDIA GPU, end to end, in about 8 minutes:
#   1. a virtual environment .venv-gpu with torch's CUDA build (torch==$TORCH_VERSION from
#      https://download.pytorch.org/whl/$CUDA_WHEEL) and this repository (pip install -e .);
#   2. the GPU's bf16 matmul peak, measured (8192² torch.matmul, best of 5 × 10);
#   3. a local Ray head, then GPT-2 124M (jobs/pydoc-gpt.yaml, model.preset=gpt2-124m) trained by one
#      worker on the GPU in bf16 for --steps steps, twice: ZeRO-2, and ZeRO-3 with the optimizer
#      offloaded to the CPU (DeepSpeedCPUAdam); tokens/s = median of the step events after the first
#      fifth; MFU = tokens/s × FLOP per token (6N + 12·layers·width·seq_len, as bench/train_bench.py)
#      / the measured peak;
#   4. the ZeRO-2 job promoted (consolidate, verify, register, deploy on Ray Serve), an API key, 16
#      greedy completions over HTTP (latency p50, all must answer 200);
#   5. one summary table, also written to bench/results/gpu_check.json; the head is stopped at exit.
#
# Usage: bench/gpu_check.sh [--steps N] [--dry-run]
#   --steps N    training steps per job (default 300)
#   --dry-run    no GPU, no install: the same flow on this machine's .venv with the tiny preset, a few
#                steps on the CPU (bf16) and a CPU fp32 matmul peak, to check the script itself
# Environment: CUDA_WHEEL (default cu128), TORCH_VERSION (default 2.13.0), PYTHON (default python3).
set -euo pipefail

cd "$(dirname "$0")/.."
STEPS=300
DRY=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --steps) STEPS="${2:?--steps needs a number}"; shift ;;
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if ! [[ "$STEPS" =~ ^[0-9]+$ ]] || (( STEPS < 10 )); then
    echo "gpu_check.sh: --steps must be a whole number >= 10, got '$STEPS'" >&2
    exit 2
fi

STARTED=$SECONDS
WORK="$(mktemp -d -t zeroplane-gpu-check-XXXXXX)"
export ZEROPLANE_HOME="$WORK/home" ZEROPLANE_STORAGE="$WORK/storage" PYTHONUNBUFFERED=1
unset RAY_ADDRESS

if (( DRY )); then
    PY=.venv/bin/python
    [[ -x "$PY" ]] || { echo "gpu_check.sh --dry-run: $PY not found; run 'make venv' first" >&2; exit 2; }
else
    command -v nvidia-smi >/dev/null || { echo "gpu_check.sh: nvidia-smi not found: this needs an NVIDIA GPU (or --dry-run)" >&2; exit 1; }
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    if [[ ! -x .venv-gpu/bin/python ]]; then
        "${PYTHON:-python3}" -m venv .venv-gpu
    fi
    PY=.venv-gpu/bin/python
    echo "[gpu_check] installing torch ${TORCH_VERSION:-2.13.0} (${CUDA_WHEEL:-cu128}) and zeroplane"
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}" --index-url "https://download.pytorch.org/whl/${CUDA_WHEEL:-cu128}"
    "$PY" -m pip install -q -e .
    "$PY" -c 'import torch; assert torch.cuda.is_available(), "torch sees no CUDA device"; print("[gpu_check]", torch.__version__, torch.cuda.get_device_name(0))'
fi

cleanup() {
    "$PY" -m zeroplane.cli.main cluster down >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

echo "[gpu_check] setup done in $((SECONDS - STARTED)) s"
"$PY" - "$DRY" "$STEPS" <<'PYEOF'
"""The measured part of bench/gpu_check.sh (see its header)."""
import json
import statistics
import sys
import time
from pathlib import Path

import requests
import torch

from zeroplane import cluster
from zeroplane.sdk import Client, parse_progress
from zeroplane.spec import load_spec
from zeroplane.spec.model import PRESETS

DRY, STEPS = sys.argv[1] == "1", int(sys.argv[2])
T0 = time.time()
SPEC = "jobs/pydoc-gpt.yaml"


def matmul_peak() -> dict:
    """Best FLOP/s of n×n matmuls: bf16 8192² on the GPU (fp32 512² on the CPU for --dry-run)."""
    n, dtype, dev = (512, torch.float32, "cpu") if DRY else (8192, torch.bfloat16, "cuda")
    a, b = torch.randn(n, n, dtype=dtype, device=dev), torch.randn(n, n, dtype=dtype, device=dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        sync()
        best = max(best, 2 * n**3 * 10 / (time.perf_counter() - t))
    return {"flop_per_s": best, "n": n, "dtype": str(dtype), "device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"}


def overrides(name: str, extra: list) -> list:
    if DRY:
        base = ["model.preset=tiny", "data.seq_len=64", "train.micro_batch_size_per_worker=4",
                "scaling.use_gpu=false", "scaling.resources_per_worker={CPU: 1}", "data.max_chars=30000"]
    else:
        base = ["model.preset=gpt2-124m", "data.seq_len=512", "train.micro_batch_size_per_worker=16",
                "scaling.use_gpu=true", "scaling.resources_per_worker={CPU: 8, GPU: 1}"]
    return [f"name={name}", *base, "scaling.num_workers=1", "train.precision=bf16", f"train.max_steps={STEPS}",
            f"train.warmup_steps={min(10, STEPS // 5)}", "train.log_every_n_steps=5", "train.eval_every_n_steps=1000000",
            "train.eval_batches=2", "checkpoint.every_n_steps=1000000", "failure.max_failures=0", *extra]


def train(zp, name: str, extra: list, peak: float) -> dict:
    spec = load_spec(SPEC, overrides(name, extra))
    t = time.time()
    job = zp.submit(spec).job_id
    state = zp.wait(job, timeout_s=900)
    events = parse_progress(zp.logs(job))
    if state != "SUCCEEDED":
        raise SystemExit(f"[gpu_check] {name}: job {job} ended {state}:\n{zp.logs(job)[-3000:]}")
    start = next(e for e in events if e["event"] == "start")
    steps = [e for e in events if e["event"] == "step"]
    rates = [e["tokens_per_s"] for e in steps if e["step"] > STEPS // 5] or [steps[-1]["tokens_per_s"]]
    tps = statistics.median(rates)
    sizes = {**PRESETS[spec.model.preset], **spec.model.config}
    layers, width, seq = sizes["n_layer"], sizes["n_embd"], spec.data.seq_len
    flop_per_token = 6 * start["parameters"] + 12 * layers * width * seq
    row = {"config": name, "job_id": job, "parameters": start["parameters"], "steps": steps[-1]["step"],
           "loss_first": steps[0]["loss"], "loss_last": steps[-1]["loss"], "tokens_per_s": tps,
           "tokens_per_s_spread": [min(rates), max(rates)], "model_flop_per_s": tps * flop_per_token,
           "mfu": tps * flop_per_token / peak, "wall_s": round(time.time() - t, 1)}
    print(f"[gpu_check] {name}: {row['tokens_per_s']:.0f} tokens/s, MFU {row['mfu']:.3f}, loss "
          f"{row['loss_first']:.2f} -> {row['loss_last']:.2f} ({row['wall_s']} s)", flush=True)
    return row


def serve(zp, job: str) -> dict:
    t = time.time()
    rec = zp.promote(job, "gpu-check")
    key = zp.create_key(name="gpu-check").key
    url = zp.serve_url("gpu-check") + "/v1/completions"
    lat, ok, text = [], 0, ""
    for i in range(16):
        s = time.perf_counter()
        r = requests.post(url, headers={"Authorization": f"Bearer {key}"}, timeout=120,
                          json={"prompt": "The try statement", "max_tokens": 32, "temperature": 0})
        lat.append(time.perf_counter() - s)
        ok += r.status_code == 200
        text = text or (r.json()["choices"][0]["text"] if r.status_code == 200 else r.text[:200])
    print(f"[gpu_check] served {rec.record['name']}:{rec.record['version']}: {ok}/16 answered 200, "
          f"p50 {statistics.median(lat) * 1e3:.0f} ms; sample {text[:60]!r}", flush=True)
    return {"version": f"{rec.record['name']}:{rec.record['version']}", "requests": 16, "ok": ok,
            "p50_ms": statistics.median(lat) * 1e3, "max_ms": max(lat) * 1e3,
            "probe_diff": rec.record["verification"]["max_abs_logit_diff"],
            "probe_atol": rec.record["verification"]["atol"], "promote_and_requests_s": round(time.time() - t, 1)}


peak = matmul_peak()
print(f"[gpu_check] matmul peak {peak['flop_per_s'] / 1e12:.1f} TFLOP/s ({peak['dtype']}, {peak['n']}², {peak['device']})", flush=True)
cluster.start_local_head(timeout_s=180)
zp = Client()
runs = [train(zp, "zero2-bf16", ["deepspeed.zero_stage=2"], peak["flop_per_s"]),
        train(zp, "zero3-offload-opt-bf16", ["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=cpu"],
              peak["flop_per_s"])]
served = serve(zp, runs[0]["job_id"])
print("\n| config | tokens/s (median, min-max) | model TFLOP/s | MFU vs measured peak | loss first -> last | job s |")
print("|---|---:|---:|---:|---|---:|")
for r in runs:
    print(f"| {r['config']} | {r['tokens_per_s']:,.0f} ({r['tokens_per_s_spread'][0]:,.0f}-{r['tokens_per_s_spread'][1]:,.0f}) "
          f"| {r['model_flop_per_s'] / 1e12:.2f} | {r['mfu']:.3f} | {r['loss_first']:.2f} -> {r['loss_last']:.2f} "
          f"| {r['wall_s']} |")
print(f"| serve {served['version']} | {served['ok']}/{served['requests']} HTTP 200, p50 {served['p50_ms']:.0f} ms "
      f"| probe diff {served['probe_diff']:.3g} (bound {served['probe_atol']:.3g}) | | | {served['promote_and_requests_s']} |")
print(f"peak {peak['flop_per_s'] / 1e12:.1f} TFLOP/s measured; {'DRY RUN (CPU, tiny)' if DRY else 'GPU'}; "
      f"measured part {time.time() - T0:.0f} s")
out = Path("bench/results")
out.mkdir(parents=True, exist_ok=True)
(out / "gpu_check.json").write_text(json.dumps({"dry_run": DRY, "steps": STEPS, "peak": peak, "runs": runs,
                                                "serve": served, "measured_s": time.time() - T0}, indent=2))
bad = served["ok"] != served["requests"]
sys.exit(1 if bad else 0)
PYEOF
echo "[gpu_check] total $((SECONDS - STARTED)) s (goal: under 480 s on the GPU machine)"
