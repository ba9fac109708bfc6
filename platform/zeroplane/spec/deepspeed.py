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


def model_hidden_size(spec: JobSpec) -> int | None:
    """The model's width (``n_embd`` for gpt2, ``hidden_size`` otherwise) as the spec sets it through
    ``model.preset`` and ``model.config``, without transformers; None when the spec does not say (a
    pretrained folder without explicit sizes: its own config decides, read on the workers)."""
    from .model import _config_kwargs

    m = spec.model
    sizes = _config_kwargs(m.architecture, None if (m.pretrained and "n_embd" not in m.config
                                                     and "hidden_size" not in m.config) else m.preset, m.config)
    width = sizes.get("n_embd", sizes.get("hidden_size"))
    return width if isinstance(width, int) and not isinstance(width, bool) and width > 0 else None


def zero_buckets(stage: int, hidden_size: int) -> Dict[str, int]:
    """ZeRO communication buffers sized from the model's width, as Hugging Face's DeepSpeed integration
    fills its ``"auto"`` values (``transformers/integrations/deepspeed.py``, ``HfTrainerDeepSpeedConfig.
    trainer_config_finalize``), in elements:

    * ``reduce_bucket_size`` = hidden² (stages 1-3): the gradient-reduction bucket. DeepSpeed's default,
      5e8 elements (2 GB in fp32), is sized for billion-parameter models; with ``contiguous_gradients``
      stage 2 keeps a buffer of that many elements, so small models paid it whole.
    * ``stage3_prefetch_bucket_size`` = int(0.9 · hidden²) (stage 3): parameters gathered ahead of use
      (default 5e7).
    * ``stage3_param_persistence_threshold`` = 10 · hidden (stage 3): parameters smaller than this stay
      whole on every rank instead of being gathered at each use (biases and LayerNorm weights; default 1e5,
      which at small widths kept whole weight matrices unpartitioned).

    Stage 0 gets nothing (no ZeRO buffers). ``deepspeed.overrides`` still wins over these.

    Raises:
        ValueError: ``hidden_size`` < 1.
    """
    if hidden_size < 1:
        raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
    out: Dict[str, int] = {}
    if stage >= 1:
        out["reduce_bucket_size"] = hidden_size * hidden_size
    if stage == 3:
        out["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
        out["stage3_param_persistence_threshold"] = 10 * hidden_size
    return out


def build_deepspeed_config(spec: JobSpec, world_size: int | None = None,
                           hidden_size: int | None = None) -> Dict[str, Any]:
    """Build the DeepSpeed config dict for ``spec``.

    Args:
        spec: a validated job spec.
        world_size: data-parallel ranks; defaults to ``spec.scaling.num_workers``.
        hidden_size: the model's width, for the ZeRO buckets (:func:`zero_buckets`); defaults to
            :func:`model_hidden_size` of the spec. With neither, DeepSpeed's default bucket sizes stay.

    Returns:
        A JSON-serialisable DeepSpeed config: batch sizes, AdamW optimizer, WarmupDecayLR scheduler
        (linear warmup to ``train.lr`` over ``warmup_steps``, then linear decay to 0 at ``max_steps``),
        gradient clipping, precision, and ``zero_optimization`` for the stage, offloads and buckets;
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
    width = hidden_size or model_hidden_size(spec)
    if width:
        zero.update(zero_buckets(ds.zero_stage, width))
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
