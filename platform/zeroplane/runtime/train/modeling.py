"""Build the causal LM from the spec, and the fixed logits probe recorded with every checkpoint."""

from __future__ import annotations

import os
from typing import List

# model_config (the transformers config of a ModelSpec) lives with the spec, so that the control plane's
# estimate can use it without importing the runtime; re-exported here for the training loop.
from ...spec.model import ModelSpec, model_config  # noqa: F401

#: Text whose first tokens form the logits probe (recorded at checkpoint time, checked at promotion).
PROBE_TEXT = "The try statement specifies exception handlers and/or cleanup code for a group of statements"
PROBE_TOKENS = 16


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
