"""Training throughput: a zeroplane ZeRO-2 job against the same training hand-written on Ray Train +
DeepSpeed (bench/raw_ray_train.py) and against a plain single-process PyTorch loop, plus model FLOP/s as a
fraction of this machine's measured fp32 matmul peak.

Usage: ``python bench/train_bench.py [--warmup 3] [--steps 30] [--repeats 5] [--no-warmup-jobs]``.

Method. First one discarded warm-up job of each side (2 steps): the first job on a fresh head pays one-time
start-up (worker processes, the package upload, imports from a cold page cache; ~45 s here) that later jobs
do not, and it used to land on whichever side ran first. Then ``--repeats`` timed pairs on the same head,
the order alternating (zeroplane first in even pairs, raw first in odd ones), so neither a load change on
this shared machine nor going first favours one side. The headline is the **median of the per-pair ratios**
zeroplane / raw with their spread (min-max and the interquartile range); the fastest run of each side and
its ratio are kept in the result for comparison with earlier reports. The same timed jobs also give the
job-control intervals (submission → first step, last step → job end) that bench/control_bench.py reports
(its :func:`control_bench.report` writes ``control_bench.json`` from them, medians over the pairs).

* zeroplane: ``jobs/pydoc-gpt.yaml`` (GPT-2 4×256, 2 workers × 8 sequences × 256 tokens, ZeRO-2, fp32,
  gloo) submitted through the SDK to a local Ray head, with ``warmup + steps + 1`` steps and checkpoint and
  evaluation periods beyond the end (so only the step-0 evaluation and the final evaluation + checkpoint
  run, both outside the timed window). Throughput is taken from the ``t`` timestamps of the per-step
  progress events: from the end of step ``warmup`` to the end of step ``warmup + steps``.
* raw Ray Train: raw_ray_train.py through ``JobSubmissionClient`` on the same head, with the DeepSpeed
  config zeroplane's ``build_deepspeed_config`` produces for the same spec, the same model config and the
  same batch shape (random tokens), timed over the same step window from its own per-step lines.
* plain PyTorch: one process, all threads, the same model, micro-batch × workers sequences per step
  (the same global batch), ``torch.optim.AdamW`` with the same hyper-parameters and gradient clipping.

Model FLOP per token = 6·N + 12·n_layer·n_embd·seq_len: 6N for the dense matmuls of forward + backward
(Kaplan et al. 2020, "Scaling Laws for Neural Language Models", §2.1) plus the attention score and
weighted-sum matmuls (12·L·d·T, as in Chowdhery et al. 2022, PaLM, Appendix B). N counts every weight
that takes part in a matmul: all parameters but the position embedding; the tied token embedding counts
once, as the LM head. Peak: ``torch.matmul`` of 1024×1024 fp32 matrices in this process with all threads,
and with one thread (each Ray Train worker gets ``OMP_NUM_THREADS=1``).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from typing import Any, Dict

import control_bench
from _common import (REPO, at_least, bar_plot, local_head, log, machine, matmul_peak, raw_config, raw_job, storage_dir, table,
                     vocab_of, warm_submission_imports, window_rate, write_result, zeroplane_job)

SPEC = "jobs/pydoc-gpt.yaml"


def model_flop_per_token(params_matmul: int, n_layer: int, n_embd: int, seq_len: int) -> int:
    """6·N + 12·n_layer·n_embd·seq_len (see the module docstring)."""
    return 6 * params_matmul + 12 * n_layer * n_embd * seq_len


def plain_pytorch(spec, vocab: int, warmup: int, steps: int) -> Dict[str, Any]:
    """The same model and global batch in one process (all threads), AdamW + gradient clipping."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from zeroplane.spec.model import PRESETS

    t = spec.train
    torch.manual_seed(t.seed)
    cfg = GPT2Config(**{**PRESETS[spec.model.preset], **spec.model.config}, vocab_size=vocab, n_positions=spec.data.seq_len,
                     bos_token_id=0, eos_token_id=0, tie_word_embeddings=spec.model.tie_word_embeddings)
    model = GPT2LMHeadModel(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), eps=1e-8, weight_decay=t.weight_decay)
    batch = t.micro_batch_size_per_worker * spec.scaling.num_workers
    gen = torch.Generator().manual_seed(t.seed)
    times = {}
    for step in range(1, warmup + steps + 1):
        x = torch.randint(0, vocab, (batch, spec.data.seq_len), generator=gen)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())
        times[step] = time.time()
    return {"threads": torch.get_num_threads(), "step_times": times,
            "parameters": sum(p.numel() for p in set(model.parameters()))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warmup", type=at_least(1), default=3, help="Steps excluded at the start (default 3).")
    ap.add_argument("--steps", type=at_least(1), default=30, help="Timed steps (default 30).")
    ap.add_argument("--repeats", type=at_least(1), default=5,
                    help="zeroplane/raw job pairs, order alternating; the median pair ratio counts (default 5).")
    ap.add_argument("--no-warmup-jobs", action="store_true",
                    help="Skip the discarded warm-up job of each side (only for a head that already ran jobs).")
    ap.add_argument("--plain-steps", type=at_least(1), default=12, help="Timed steps of the plain PyTorch loop (default 12).")
    args = ap.parse_args()

    from zeroplane.spec import load_spec
    from zeroplane.spec.model import PRESETS

    t0 = time.monotonic()
    w, s = args.warmup, args.steps
    store = storage_dir()
    overrides = [f"checkpoint.storage_path={store}", f"train.max_steps={w + s + 1}",
                 "checkpoint.every_n_steps=1000000", "train.eval_every_n_steps=1000000", "failure.max_failures=0",
                 f"train.warmup_steps={min(20, w + s)}"]
    spec = load_spec(REPO / SPEC, overrides)
    sizes = {**PRESETS[spec.model.preset], **spec.model.config}
    L, d, T = sizes["n_layer"], sizes["n_embd"], spec.data.seq_len
    tokens_per_step = spec.scaling.num_workers * spec.train.micro_batch_size_per_worker * T

    log("matmul peak (1024x1024 fp32): all threads, then 1 thread")
    import torch

    peak_all, peak_1 = matmul_peak(torch.get_num_threads()), matmul_peak(1)

    warm_submission_imports()
    runs: Dict[str, list] = {"zeroplane": [], "raw Ray Train": []}
    jobs: Dict[str, list] = {"zeroplane": [], "raw Ray Train": []}
    vocab = None
    try:
        with local_head() as zp:
            if not args.no_warmup_jobs:
                log("warm-up jobs (2 steps each, discarded): zeroplane, then raw")
                z = zeroplane_job(zp, SPEC, [*overrides, "train.max_steps=2", "train.warmup_steps=1"])
                vocab = vocab_of(spec, z["parameters"])
                raw_job(zp, raw_config(spec, 2, vocab, store))
            for rep in range(args.repeats):
                order = ("zeroplane", "raw Ray Train") if rep % 2 == 0 else ("raw Ray Train", "zeroplane")
                done: Dict[str, Any] = {}
                for name in order:
                    log(f"{name} job ({w + s + 1} steps) [{rep + 1}/{args.repeats}]")
                    if name == "zeroplane":
                        done[name] = zeroplane_job(zp, SPEC, overrides)
                        vocab = vocab or vocab_of(spec, done[name]["parameters"])
                    else:  # pair 0 runs zeroplane first, so the vocabulary is known by now
                        done[name] = raw_job(zp, raw_config(spec, w + s + 1, vocab, store))
                z, r = done["zeroplane"], done["raw Ray Train"]
                for name, j in (("zeroplane", z), ("raw Ray Train", r)):
                    jobs[name].append(j)
                    runs[name].append({"job_id": j["job_id"], "parameters": j["parameters"],
                                       **window_rate(j["step_times"], w, w + s, tokens_per_step)})
                log(f"pair {rep + 1}: zeroplane {runs['zeroplane'][-1]['tokens_per_s']:.0f} tokens/s, raw "
                    f"{runs['raw Ray Train'][-1]['tokens_per_s']:.0f} tokens/s")
    finally:
        shutil.rmtree(store, ignore_errors=True)

    ps = min(s, args.plain_steps)
    log(f"plain PyTorch loop ({w + ps} steps, one process)")
    plain = plain_pytorch(spec, vocab, w, ps)
    plain_rate = window_rate(plain["step_times"], w, w + ps, tokens_per_step)

    best = {k: max(v, key=lambda r: r["tokens_per_s"]) for k, v in runs.items()}
    n_params = best["zeroplane"]["parameters"]
    assert best["raw Ray Train"]["parameters"] == n_params == plain["parameters"], "models differ"
    n_matmul = n_params - T * d  # all but the position embedding
    flop_tok = model_flop_per_token(n_matmul, L, d, T)
    rows, result_rows = [], []
    for name, r in [("zeroplane", best["zeroplane"]), ("raw Ray Train", best["raw Ray Train"]),
                    ("plain PyTorch", plain_rate)]:
        flops = flop_tok * r["tokens_per_s"]
        row = {"run": name, "tokens_per_s": r["tokens_per_s"], "s_per_step": r["s_per_step"],
               "model_flop_per_s": flops, "mfu_vs_all_thread_peak": flops / peak_all,
               "mfu_vs_2x_one_thread_peak": flops / (spec.scaling.num_workers * peak_1)}
        result_rows.append(row)
        rows.append([name, r["tokens_per_s"], r["s_per_step"], flops / 1e9, row["mfu_vs_all_thread_peak"],
                     row["mfu_vs_2x_one_thread_peak"]])
    z, raw = best["zeroplane"]["tokens_per_s"], best["raw Ray Train"]["tokens_per_s"]
    pair_ratios = [zr["tokens_per_s"] / rr["tokens_per_s"] for zr, rr in zip(runs["zeroplane"], runs["raw Ray Train"])]
    median_pair = statistics.median(pair_ratios)
    quartiles = statistics.quantiles(pair_ratios, n=4) if len(pair_ratios) >= 2 else [median_pair] * 3
    spread = {"min": min(pair_ratios), "max": max(pair_ratios), "q1": quartiles[0], "q3": quartiles[2],
              "pairs": len(pair_ratios), "first_in_pair": ["zeroplane" if i % 2 == 0 else "raw Ray Train"
                                                          for i in range(len(pair_ratios))]}
    result = {
        "benchmark": "train", "machine": machine(), "spec": SPEC, "overrides": overrides,
        "model": {"parameters": n_params, "parameters_in_matmuls": n_matmul, "n_layer": L, "n_embd": d,
                  "seq_len": T, "vocab": vocab, "flop_per_token": flop_tok,
                  "flop_formula": "6N + 12*n_layer*n_embd*seq_len (Kaplan et al. 2020 6N; attention term as PaLM App. B)"},
        "window": {"warmup_steps": w, "timed_steps": s, "tokens_per_step": tokens_per_step},
        "peak_flop_per_s": {"all_threads": peak_all, "threads": torch.get_num_threads(), "one_thread": peak_1,
                            "matmul": "1024x1024 fp32"},
        "runs": runs, "plain_pytorch": {"threads": plain["threads"], "timed_steps": ps, **plain_rate}, "rows": result_rows,
        "ratios": {"zeroplane_over_raw_ray_train": z / raw, "zeroplane_over_raw_ray_train_per_pair": pair_ratios,
                   "zeroplane_over_raw_ray_train_median_pair": median_pair,
                   "zeroplane_over_raw_ray_train_pair_spread": spread,
                   "zeroplane_over_plain_pytorch": z / plain_rate["tokens_per_s"],
                   "raw_ray_train_over_plain_pytorch": raw / plain_rate["tokens_per_s"]},
        "goal": {"zeroplane_over_raw_ray_train": 0.97},
        "total_s": time.monotonic() - t0,
    }
    print(f"\ntraining throughput: GPT-2 {L}x{d} ({n_params / 1e6:.2f} M params, vocab {vocab}), seq_len {T}, "
          f"{tokens_per_step} tokens/step, steps {w + 1}-{w + s} timed; matmul peak {peak_all / 1e9:.1f} GFLOP/s "
          f"({torch.get_num_threads()} threads), {peak_1 / 1e9:.1f} GFLOP/s (1 thread)")
    print(table(["run", "tokens/s", "s/step", "model GFLOP/s", "of peak (all thr)", "of 2x1-thr peak"], rows))
    r = result["ratios"]
    print(f"zeroplane / raw Ray Train = {median_pair:.3f} (median of {len(pair_ratios)} pairs, order alternating; "
          f"min-max {spread['min']:.3f}-{spread['max']:.3f}, IQR {spread['q1']:.3f}-{spread['q3']:.3f}; goal >= 0.97; "
          f"pairs: {', '.join(f'{x:.3f}' for x in pair_ratios)}); fastest of each {r['zeroplane_over_raw_ray_train']:.3f}; "
          f"zeroplane / plain PyTorch = {r['zeroplane_over_plain_pytorch']:.3f}")
    out = write_result("train_bench", result)
    png = bar_plot("train_bench", f"training throughput, GPT-2 {L}x{d}, ZeRO-2, 2 CPU workers",
                   [x["run"] for x in result_rows], {"tokens/s": [x["tokens_per_s"] for x in result_rows]}, "tokens/s")
    print(f"wrote {out} and {png}")
    control_bench.report(jobs, f"the {w + s + 1}-step jobs of the training benchmark", t0)
    print(f"training benchmark: {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
