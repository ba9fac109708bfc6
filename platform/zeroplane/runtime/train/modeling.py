"""Build the causal LM from the spec, and the fixed logits probe recorded with every checkpoint."""

from __future__ import annotations

import os
from typing import Any, Dict, List

from ...errors import SpecError
from ...spec.model import PRESETS, ModelSpec

#: Text whose first tokens form the logits probe (recorded at checkpoint time, checked at promotion).
PROBE_TEXT = "The try statement specifies exception handlers and/or cleanup code for a group of statements"
PROBE_TOKENS = 16

# GPT-2 preset keys -> generic transformers names, for architectures other than gpt2.
_GENERIC = {"n_layer": "num_hidden_layers", "n_embd": "hidden_size", "n_head": "num_attention_heads"}


def model_config(spec: ModelSpec, vocab_size: int, seq_len: int, bos_id: int | None, eos_id: int | None):
    """The transformers config for a model built from scratch.

    Preset sizes are merged under ``spec.config``; ``vocab_size`` and the context length
    (``n_positions`` / ``max_position_embeddings`` = ``seq_len``) come from the tokenizer and data.

    Raises:
        SpecError: ``spec.architecture`` is not a transformers model type.
    """
    from transformers import AutoConfig

    sizes: Dict[str, Any] = dict(PRESETS[spec.preset]) if spec.preset else {}
    if spec.architecture != "gpt2":
        sizes = {_GENERIC[k]: v for k, v in sizes.items()}
        if "hidden_size" in sizes:
            sizes.setdefault("intermediate_size", 4 * sizes["hidden_size"])
    sizes.update(spec.config)
    ctx_key = "n_positions" if spec.architecture == "gpt2" else "max_position_embeddings"
    sizes.setdefault(ctx_key, seq_len)
    try:
        return AutoConfig.for_model(
            spec.architecture,
            vocab_size=vocab_size,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            tie_word_embeddings=spec.tie_word_embeddings,
            **sizes,
        )
    except ValueError as e:
        raise SpecError(f"model.architecture = {spec.architecture!r}: {e}; use a transformers model type such as gpt2") from None


def build_model(spec: ModelSpec, config, seed: int):
    """A causal LM: ``from_pretrained(spec.pretrained)`` or fresh weights from ``config`` (seeded)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if spec.pretrained:
        return AutoModelForCausalLM.from_pretrained(os.path.expanduser(spec.pretrained), torch_dtype=torch.float32)
    return AutoModelForCausalLM.from_config(config)


def probe_ids(tokenizer) -> List[int]:
    """Token ids of the fixed probe (first ``PROBE_TOKENS`` tokens of ``PROBE_TEXT``)."""
    return tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"][:PROBE_TOKENS]


def count_parameters(model) -> int:
    """Unique parameters (tied weights counted once)."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.ds_numel if hasattr(p, "ds_numel") else p.numel()
    return n
