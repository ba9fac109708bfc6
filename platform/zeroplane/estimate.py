"""Per-worker memory for model states (parameters, gradients, optimizer states) under DeepSpeed ZeRO.

Two independent numbers for the same spec:

* the ZeRO paper's formula (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training
  Trillion Parameter Models", §3 and Figure 1), per data-parallel rank, for Ψ parameters on N ranks
  with mixed-precision Adam (2-byte parameters and gradients, K = 12 bytes of fp32 master weights,
  momentum and variance)::

      stage 0: (2 + 2 + K) Ψ        stage 2: 2Ψ + (2 + K) Ψ / N
      stage 1: 2Ψ + 2Ψ + K Ψ / N     stage 3: (2 + 2 + K) Ψ / N

  For ``train.precision: fp32`` the parameter and gradient copies are 4 bytes each. K stays 12 for
  ZeRO 1-3, because DeepSpeed keeps its own flat fp32 partition of the weights next to the module's
  fp32 parameters (``single_partition_of_fp32_groups`` is a clone), and is 8 for stage 0, where the
  torch optimizer updates the fp32 parameters in place (momentum + variance only). With
  ``offload_optimizer: cpu`` the K term lives in host memory, with ``offload_param: cpu`` (stage 3)
  the parameter term too; both are reported under ``host_bytes``.

* DeepSpeed's own estimators, ``estimate_zero2_model_states_mem_needs`` (stages 1-2; DeepSpeed has none
  for stage 1, whose optimizer is the same code as stage 2's) and
  ``estimate_zero3_model_states_mem_needs`` (the functions behind its ``..._all_cold`` printers), with
  their default ``additional_buffer_factor`` 1.5 for host memory. They assume 16-bit parameters.

Activations, temporary buffers and the framework itself come on top of both. torch, transformers and
deepspeed are imported inside the functions.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

from .spec.model import JobSpec


def zero_paper_bytes(psi: int, n: int, stage: int, precision: str = "bf16", offload_optimizer: bool = False,
                     offload_param: bool = False) -> Dict[str, Any]:
    """Model-state bytes per data-parallel rank from the ZeRO paper's formula (see the module docstring).

    Args:
        psi: parameters Ψ (tied weights counted once).
        n: data-parallel ranks N (Ray Train workers), >= 1.
        stage: ZeRO stage 0-3.
        precision: ``fp32`` (4-byte parameters/gradients) or ``bf16``/``fp16`` (2-byte, the paper's case).
        offload_optimizer: optimizer states (K term) in host memory instead.
        offload_param: stage 3 parameters (parameter term) in host memory instead.

    Returns:
        ``{"params_bytes", "grads_bytes", "optimizer_bytes", "device_bytes", "host_bytes", "k"}`` for
        one rank; ``device_bytes + host_bytes`` is the formula's total.

    Raises:
        ValueError: ``stage`` not in 0-3 or ``n`` < 1.
    """
    if stage not in (0, 1, 2, 3) or n < 1:
        raise ValueError(f"stage must be 0-3 and n >= 1 (got stage={stage}, n={n})")
    pb = 4 if precision == "fp32" else 2
    k = 8 if (precision == "fp32" and stage == 0) else 12
    params = pb * psi / (n if stage == 3 else 1)
    grads = pb * psi / (n if stage >= 2 else 1)
    optim = k * psi / (n if stage >= 1 else 1)
    host = (optim if offload_optimizer else 0) + (params if offload_param else 0)
    total = params + grads + optim
    return {"k": k, "params_bytes": int(params), "grads_bytes": int(grads), "optimizer_bytes": int(optim),
            "device_bytes": int(total - host), "host_bytes": int(host)}


def _vocab_size(spec: JobSpec) -> int | None:
    """The trained BPE's vocabulary size (an upper bound), or None when it comes from a tokenizer folder."""
    if spec.model.pretrained or spec.tokenizer.path or spec.tokenizer.train_bpe is None:
        return None
    return spec.tokenizer.train_bpe.vocab_size


def gpt2_parameters(spec: JobSpec) -> Tuple[int, int] | None:
    """Ψ and the largest layer of a from-scratch GPT-2 counted from its config alone (no torch).

    Per block: attention ``c_attn`` d·3d + 3d and ``c_proj`` d² + d, MLP 2·d·inner + inner + d
    (inner = ``n_inner`` or 4d), two LayerNorms 4d; plus token (V·d) and position (P·d) embeddings, the
    final LayerNorm 2d and, unless tied, the LM head V·d. None for other architectures, pretrained
    models and given tokenizers (use :func:`count_parameters`).
    """
    from .spec.model import PRESETS

    vocab = _vocab_size(spec)
    if spec.model.architecture != "gpt2" or vocab is None:
        return None
    cfg = {**(PRESETS[spec.model.preset] if spec.model.preset else {}), **spec.model.config}
    d, layers = int(cfg.get("n_embd", 768)), int(cfg.get("n_layer", 12))
    pos = int(cfg.get("n_positions", spec.data.seq_len))
    inner = int(cfg.get("n_inner") or 4 * d)
    attn, proj, mlp_in, mlp_out = 3 * d * d + 3 * d, d * d + d, d * inner + inner, inner * d + d
    total = vocab * d + pos * d + layers * (attn + proj + mlp_in + mlp_out + 4 * d) + 2 * d
    if not spec.model.tie_word_embeddings:
        total += vocab * d
    return total, max(vocab * d, pos * d, attn, mlp_in, mlp_out)


def count_parameters(spec: JobSpec) -> Tuple[int, int]:
    """Ψ and the largest layer's parameter count of the spec's model, built on the meta device.

    The vocabulary is ``tokenizer.train_bpe.vocab_size`` for a trained BPE (an upper bound: a small
    corpus may give fewer merges), else the size of the given or pretrained tokenizer.

    Returns:
        ``(total_params, largest_layer_params)``; tied weights counted once.
    """
    import os

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .spec.model import model_config

    if spec.model.pretrained:
        cfg = AutoConfig.from_pretrained(os.path.expanduser(spec.model.pretrained))
    else:
        if spec.tokenizer.path or spec.tokenizer.train_bpe is None:
            vocab = len(AutoTokenizer.from_pretrained(os.path.expanduser(spec.tokenizer.path)))
        else:
            vocab = spec.tokenizer.train_bpe.vocab_size
        cfg = model_config(spec.model, vocab, spec.data.seq_len, None, None)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    seen: Dict[int, int] = {}
    for p in model.parameters():
        seen.setdefault(id(p), p.numel())
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return sum(seen.values()), largest


def estimate(spec: JobSpec, runtime: bool = True) -> Dict[str, Any]:
    """Per-worker model-state memory for ``spec``: the paper's formula and DeepSpeed's estimator.

    Args:
        spec: the job spec.
        runtime: build the model on the meta device and call DeepSpeed's estimator (imports torch,
            transformers, deepspeed). ``False`` (``train submit --dry-run``, which loads none of them)
            counts a GPT-2 from its config and gives the paper's formula only.

    Returns:
        ``{"parameters", "largest_layer_parameters", "workers", "zero_stage", "precision",
        "paper": {... zero_paper_bytes ..., "device_gb", "host_gb"}, "deepspeed": {"device_gb",
        "host_gb_all_workers", "function"} | None, "note"}``. GB are 10^9 bytes.

    Raises:
        ZeroplaneError: ``runtime=False`` and the model cannot be counted from its config alone.
    """
    from .errors import ZeroplaneError

    counted = count_parameters(spec) if runtime else gpt2_parameters(spec)
    if counted is None:
        raise ZeroplaneError("this model is counted by building it; run `zeroplane train estimate SPEC`")
    psi, largest = counted
    ds, n, stage = spec.deepspeed, spec.scaling.num_workers, spec.deepspeed.zero_stage
    paper = zero_paper_bytes(psi, n, stage, spec.train.precision, ds.offload_optimizer != "none",
                             ds.offload_param != "none")
    paper.update(device_gb=round(paper["device_bytes"] / 1e9, 4), host_gb=round(paper["host_bytes"] / 1e9, 4))
    ds_est = None
    if runtime:
        import contextlib
        import sys

        with contextlib.redirect_stdout(sys.stderr):  # deepspeed logs its accelerator choice on stdout
            import deepspeed  # noqa: F401
    if runtime and stage in (1, 2):
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, dev = estimate_zero2_model_states_mem_needs(psi, num_gpus_per_node=n, num_nodes=1,
                                                         cpu_offload=ds.offload_optimizer != "none")
        ds_est = {"function": "deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs",
                  "device_gb": round(dev / 1e9, 4), "host_gb_all_workers": round(cpu / 1e9, 4)}
    elif runtime and stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, dev, _ = estimate_zero3_model_states_mem_needs(psi, largest, num_gpus_per_node=n, num_nodes=1,
                                                            cpu_offload=ds.offload_optimizer != "none",
                                                            cpu_offload_params=ds.offload_param != "none",
                                                            zero_init=False)
        ds_est = {"function": "deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs",
                  "device_gb": round(dev / 1e9, 4), "host_gb_all_workers": round(cpu / 1e9, 4)}
    return {"parameters": psi, "largest_layer_parameters": largest, "workers": n, "zero_stage": stage,
            "precision": spec.train.precision, "paper": paper,
            "deepspeed": ds_est if runtime else "not computed here; `zeroplane train estimate SPEC` adds it",
            "note": "model states only (parameters, gradients, optimizer states), per worker; activations "
                    "and buffers come on top. DeepSpeed's estimator assumes 16-bit parameters; its host "
                    "figure is for all workers of a node, with a 1.5 buffer factor; it has none for stage 0."}
