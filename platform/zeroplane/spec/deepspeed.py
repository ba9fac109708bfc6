"""Generate the DeepSpeed config from a job spec: a pure function, no deepspeed import.

Reference: DeepSpeed config JSON (https://www.deepspeed.ai/docs/config-json/). The batch identity
``train_batch_size = train_micro_batch_size_per_gpu * gradient_accumulation_steps * world_size`` is
DeepSpeed's own and is checked by DeepSpeed at ``initialize``.
"""

from __future__ import annotations

import copy
from typing import Any, Dict

from .model import JobSpec


def deep_merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    """Return ``base`` with ``extra`` merged in recursively (mappings merge, other values replace)."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def build_deepspeed_config(spec: JobSpec, world_size: int | None = None) -> Dict[str, Any]:
    """Build the DeepSpeed config dict for ``spec``.

    Args:
        spec: a validated job spec.
        world_size: data-parallel ranks; defaults to ``spec.scaling.num_workers``.

    Returns:
        A JSON-serialisable DeepSpeed config: batch sizes, AdamW optimizer, WarmupDecayLR scheduler
        (linear warmup to ``train.lr`` over ``warmup_steps``, then linear decay to 0 at ``max_steps``),
        gradient clipping, precision, and ``zero_optimization`` for the stage and offloads;
        ``deepspeed.overrides`` merged last.

    On CPU workers (``scaling.use_gpu: false``) without optimizer offload, the optimizer is
    ``torch.optim.AdamW`` (``torch_adam: true``) because DeepSpeed's FusedAdam needs CUDA; with
    ``offload_optimizer: cpu`` DeepSpeed picks its CPU Adam.
    """
    ws = world_size or spec.scaling.num_workers
    t, ds = spec.train, spec.deepspeed
    opt_params: Dict[str, Any] = {
        "lr": t.lr,
        "betas": list(t.betas),
        "eps": 1e-8,
        "weight_decay": t.weight_decay,
    }
    if not spec.scaling.use_gpu and ds.offload_optimizer == "none":
        opt_params["torch_adam"] = True
    zero: Dict[str, Any] = {"stage": ds.zero_stage}
    pin = bool(spec.scaling.use_gpu)
    if ds.zero_stage >= 1 and ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer, "pin_memory": pin}
    if ds.zero_stage == 3:
        if ds.offload_param != "none":
            zero["offload_param"] = {"device": ds.offload_param, "pin_memory": pin}
        # Consolidation uses zero_to_fp32 on the saved shards, so no gathered 16-bit copy on save.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    if ds.zero_stage in (1, 2):
        zero.update({"overlap_comm": bool(spec.scaling.use_gpu), "contiguous_gradients": True})
    cfg: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size_per_worker,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.micro_batch_size_per_worker * t.gradient_accumulation_steps * ws,
        "gradient_clipping": t.grad_clip,
        "optimizer": {"type": "AdamW", "params": opt_params},
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "total_num_steps": t.max_steps,
                "warmup_min_lr": 0.0,
                "warmup_max_lr": t.lr,
                "warmup_num_steps": t.warmup_steps,
                "warmup_type": "linear",
            },
        },
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if t.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif t.precision == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return deep_merge(cfg, ds.overrides)
