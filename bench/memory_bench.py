"""Memory per training worker by ZeRO stage at GPT-2 124M: live tensor bytes and peak RSS against the ZeRO
paper's model-state formula and DeepSpeed's own estimators.

Usage: ``python bench/memory_bench.py [--preset gpt2-124m] [--steps 2] [--parallel 2] [--precision fp32|bf16]
[--configs "stage 0,stage 3"]``.

Each configuration is a zeroplane job (``jobs/pydoc-gpt.yaml`` with ``model.preset`` = ``--preset``, 2
workers, fp32, 2 sequences × 128 tokens per worker, a few steps and the final checkpoint) submitted
through the SDK to a local Ray head: ZeRO stage 0, 1, 2, 3, stage 2 with ``offload_optimizer: cpu``, and
stages 2 and 3 once more with DeepSpeed's default bucket sizes (``reduce_bucket_size`` 5e8,
``stage3_prefetch_bucket_size`` 5e7, ``stage3_param_persistence_threshold`` 1e5: what every job used before
zeroplane sized them from the model, ``zeroplane.spec.deepspeed.zero_buckets``) for the before/after figure.

Two measures per worker (max over the ranks), both from the job's last ``step`` progress event, before
the final checkpoint:

* **live tensors** (``live_tensor_mb``): the bytes of every distinct tensor storage the worker still
  references — parameters, gradients, optimizer states, DeepSpeed's flat partitions and buckets — which is
  what DeepSpeed's ``see_memory_usage`` reads from the allocator on a GPU (``memory_allocated``); torch keeps
  no such counter for CPU memory, so the worker walks its objects. Compared with the formula alone
  (activations are freed by then).
* **peak RSS − baseline** (``ru_maxrss``): a stage-0 job of the ``tiny`` preset measures the runtime
  (Python, torch, Ray, DeepSpeed, data); the rest is model states + activations + transient copies + what
  the allocator kept. Compared with the formula plus the activation term below.

Formula: ``zeroplane.estimate.zero_paper_bytes`` (Rajbhandari et al. 2020, fp32: 4-byte parameters and
gradients, K = 8 for stage 0, 12 for ZeRO 1-3; device + host), N = 2, Ψ from the job. Activation term,
stated: fp32 activations kept for backward per worker, ``2 · s·b·h·L·(34 + 5·a·s/h)`` bytes (Korthikanti et
al. 2022, eq. 2, which counts 16-bit activations; doubled for fp32) plus the logits, their log-softmax and
gradient ``3 · 4·b·s·V``. DeepSpeed's estimators (``estimate_zero2_model_states_mem_needs``,
``estimate_zero3_model_states_mem_needs``, via ``zeroplane.estimate``) assume 16-bit parameters on a GPU; they
are listed for reference (device bytes per GPU), not compared.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional

from _common import (REPO, at_least, bar_plot, local_head, log, machine, storage_dir, submit_zeroplane, table,
                     wait_job, write_result)

SPEC = "jobs/pydoc-gpt.yaml"
SEQ, MICRO = 128, 2
#: DeepSpeed's defaults (deepspeed/runtime/zero/config.py), as every job had before zero_buckets.
DS_DEFAULT_BUCKETS = ["deepspeed.overrides.zero_optimization.reduce_bucket_size=500000000",
                      "deepspeed.overrides.zero_optimization.stage3_prefetch_bucket_size=50000000",
                      "deepspeed.overrides.zero_optimization.stage3_param_persistence_threshold=100000"]
CONFIGS = [  # (label, preset or None for --preset, zero_stage, offload_optimizer, extra overrides)
    ("baseline (tiny, stage 0)", "tiny", 0, "none", []),
    ("stage 0", None, 0, "none", []),
    ("stage 1", None, 1, "none", []),
    ("stage 2", None, 2, "none", []),
    ("stage 3", None, 3, "none", []),
    ("stage 2 + offload cpu", None, 2, "cpu", []),
    ("stage 2, DeepSpeed default buckets", None, 2, "none", DS_DEFAULT_BUCKETS[:1]),
    ("stage 3, DeepSpeed default buckets", None, 3, "none", DS_DEFAULT_BUCKETS),
]


def activation_bytes(layers: int, width: int, heads: int, vocab: int, seq: int = SEQ, micro: int = MICRO) -> int:
    """fp32 activation memory per worker for one micro-batch of a GPT-2: Korthikanti et al. 2022 (eq. 2,
    ``s·b·h·(34 + 5·a·s/h)`` bytes per layer for 16-bit activations), doubled for 4-byte values, plus the
    logits, their log-softmax and gradient (``3 · 4·b·s·V``)."""
    per_layer = seq * micro * width * (34 + 5 * heads * seq / width)
    return int(2 * per_layer * layers + 3 * 4 * micro * seq * vocab)


def deepspeed_estimate(stage: int, psi: int, largest: int, workers: int, offload: bool) -> Optional[float]:
    """DeepSpeed's estimator for the stage: device bytes per GPU in MB (16-bit parameters assumed); None for stage 0."""
    import contextlib
    import importlib

    with contextlib.redirect_stdout(sys.stderr):  # deepspeed logs its accelerator choice on stdout
        importlib.import_module("deepspeed")
    if stage in (1, 2):
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        _, dev = estimate_zero2_model_states_mem_needs(psi, num_gpus_per_node=workers, num_nodes=1, cpu_offload=offload)
        return dev / 2**20
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        _, dev, _ = estimate_zero3_model_states_mem_needs(psi, largest, num_gpus_per_node=workers, num_nodes=1,
                                                          cpu_offload=offload, cpu_offload_params=False, zero_init=False)
        return dev / 2**20
    return None


def run_one(zp, label: str, preset: str, stage: int, offload: str, extra: List[str], steps: int,
            store: str, precision: str = "fp32") -> Dict[str, Any]:
    from zeroplane.estimate import zero_paper_bytes
    from zeroplane.sdk import parse_progress
    from zeroplane.spec import load_spec
    from zeroplane.spec.model import PRESETS

    overrides = [f"model.preset={preset}", f"deepspeed.zero_stage={stage}", f"deepspeed.offload_optimizer={offload}",
                 f"checkpoint.storage_path={store}", f"train.max_steps={steps}", "train.warmup_steps=1",
                 f"train.micro_batch_size_per_worker={MICRO}", f"data.seq_len={SEQ}", "data.max_chars=200000",
                 "train.eval_batches=1", "checkpoint.every_n_steps=1000000", "train.eval_every_n_steps=1000000",
                 "failure.max_failures=0", f"train.precision={precision}", *extra]
    spec = load_spec(REPO / SPEC, overrides)
    t = time.monotonic()
    job = submit_zeroplane(zp, SPEC, overrides)
    evs = parse_progress(wait_job(zp, job)["logs"])
    start = next(e for e in evs if e["event"] == "start")
    done = next(e for e in evs if e["event"] == "done")
    last = [e for e in evs if e["event"] == "step"][-1]
    psi, n = start["parameters"], start["world_size"]
    sizes = PRESETS[preset]
    vocab = spec.tokenizer.train_bpe.vocab_size
    paper = zero_paper_bytes(psi, n, stage, precision, offload != "none")
    paper_mb = (paper["device_bytes"] + paper["host_bytes"]) / 2**20
    act_mb = activation_bytes(sizes["n_layer"], sizes["n_embd"], sizes["n_head"], vocab) / 2**20
    if precision != "fp32":  # 2-byte activations: the formula's own unit (the logits stay fp32 in the loss)
        act_mb -= (activation_bytes(sizes["n_layer"], sizes["n_embd"], sizes["n_head"], 0) / 2) / 2**20
    log(f"{label}: {psi / 1e6:.1f} M params, live tensors {last.get('live_tensor_mb')} MB, peak RSS "
        f"{last['peak_rss_mb']} MB, with the checkpoint {done['peak_rss_mb']} MB ({time.monotonic() - t:.0f}s)")
    return {"label": label, "preset": preset, "zero_stage": stage, "offload_optimizer": offload, "overrides": extra,
            "job_id": job, "parameters": psi, "workers": n, "peak_rss_mb": last["peak_rss_mb"],
            "live_tensor_mb": last.get("live_tensor_mb"), "peak_rss_mb_with_checkpoint": done["peak_rss_mb"],
            "paper_model_state_mb": paper_mb, "paper": paper, "activation_mb": act_mb,
            "deepspeed_estimate_device_mb": deepspeed_estimate(stage, psi, vocab * sizes["n_embd"], n,
                                                               offload != "none")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2-124m", help="Model preset of the measured jobs (default gpt2-124m).")
    ap.add_argument("--steps", type=at_least(1), default=2, help="Training steps per job (default 2).")
    ap.add_argument("--parallel", type=at_least(1), default=2, help="Jobs at once (2 workers each; default 2).")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="train.precision of the measured jobs (default fp32; the baseline job stays fp32).")
    ap.add_argument("--configs", default="", help="Comma-separated labels to run (default: all), e.g. 'stage 0,stage 3'.")
    args = ap.parse_args()
    wanted = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in [label for label, *_ in CONFIGS[1:]]]
    if unknown:
        ap.error(f"--configs: unknown {unknown}; choose from {[label for label, *_ in CONFIGS[1:]]}")
    configs = [CONFIGS[0]] + [c for c in CONFIGS[1:] if not wanted or c[0] in wanted]

    t0 = time.monotonic()
    store = storage_dir()
    try:
        with local_head(num_cpus=max(4, 2 * args.parallel)) as zp, ThreadPoolExecutor(args.parallel) as pool:
            futs = [pool.submit(run_one, zp, label, preset or args.preset, stage, off, extra, args.steps, store,
                                "fp32" if preset == "tiny" else args.precision)
                    for label, preset, stage, off, extra in configs]
            runs: List[Dict[str, Any]] = [f.result() for f in futs]
    finally:
        shutil.rmtree(store, ignore_errors=True)

    base = max(runs[0]["peak_rss_mb"])
    by_label = {r["label"]: r for r in runs}
    rows = []
    for r in runs[1:]:
        live = max(r["live_tensor_mb"]) if r["live_tensor_mb"] else float("nan")
        rss = max(r["peak_rss_mb"]) - base
        r.update(baseline_peak_rss_mb=base, model_state_rss_mb=rss, live_tensor_max_mb=live,
                 live_over_paper=live / r["paper_model_state_mb"],
                 rss_over_paper_plus_activations=rss / (r["paper_model_state_mb"] + r["activation_mb"]),
                 measured_over_paper=rss / r["paper_model_state_mb"])
        ds = r["deepspeed_estimate_device_mb"]
        rows.append([r["label"], live, r["paper_model_state_mb"], r["live_over_paper"], rss,
                     r["paper_model_state_mb"] + r["activation_mb"], r["rss_over_paper_plus_activations"],
                     "-" if ds is None else f"{ds:.0f}"])
    s0 = by_label.get("stage 0")
    ratios = {label: {"live": by_label[label]["live_tensor_max_mb"] / s0["live_tensor_max_mb"],
                      "rss": by_label[label]["model_state_rss_mb"] / s0["model_state_rss_mb"]}
              for label in by_label if label.startswith("stage")} if s0 else {}
    result = {"benchmark": "memory", "machine": machine(), "spec": SPEC, "preset": args.preset, "precision": args.precision,
              "parameters": runs[1]["parameters"], "workers": runs[1]["workers"], "baseline": runs[0], "runs": runs[1:],
              "over_stage0": ratios, "activation_mb": runs[1]["activation_mb"],
              "note": "per worker, max over the ranks: live tensor bytes vs the ZeRO paper's model-state bytes "
                      "(fp32), and peak RSS minus a tiny stage-0 job's vs that formula plus the stated activation "
                      "term; DeepSpeed's estimators (16-bit parameters, per GPU) for reference",
              "total_s": time.monotonic() - t0}
    print(f"\nmemory per worker: GPT-2 preset {args.preset} ({runs[1]['parameters'] / 1e6:.1f} M params), "
          f"{runs[1]['workers']} workers, {args.precision}, {MICRO} × {SEQ} tokens; baseline peak RSS {base:.0f} MB subtracted; "
          f"activation term {runs[1]['activation_mb']:.0f} MB")
    print(table(["config", "live tensors MB", "ZeRO formula MB", "live/formula", "peak RSS - baseline MB",
                 "formula + activations MB", "RSS/(formula+act)", "DeepSpeed estimate MB (16-bit, per GPU)"], rows))
    print(table(["config", "live / stage 0", "RSS - baseline / stage 0"],
                [[k, v["live"], v["rss"]] for k, v in ratios.items()]))
    name = "memory_bench" if args.precision == "fp32" else f"memory_bench_{args.precision}"
    out = write_result(name, result)
    png = bar_plot(name, f"memory per worker, {runs[1]['parameters'] / 1e6:.0f} M params, 2 workers",
                   [r["label"] for r in runs[1:]],
                   {"live tensors": [r["live_tensor_max_mb"] for r in runs[1:]],
                    "peak RSS - baseline": [r["model_state_rss_mb"] for r in runs[1:]],
                    "ZeRO paper formula": [r["paper_model_state_mb"] for r in runs[1:]]}, "MB per worker")
    print(f"wrote {out} and {png} ({result['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
