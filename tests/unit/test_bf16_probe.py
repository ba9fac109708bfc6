"""The promotion probe's tolerance follows the training precision recorded with the checkpoint.

A real 4-layer GPT-2 built from a config: its bf16 forward pass plays the logits a bf16 training engine
records at checkpoint time, its fp32 weights the consolidated export. ``verify`` must accept that pair
when the checkpoint says ``precision: bf16`` and refuse it, naming both bounds, when it says fp32; a
wrong weight is refused under either.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from zeroplane import layout
from zeroplane.errors import SpecError
from zeroplane.promote import PROBE_ATOL, probe_tolerance, verify


def test_tolerance_formula():
    # fp32 training: the export cast's bound alone
    assert probe_tolerance("float32", "fp32", 12, 10.0) == PROBE_ATOL["float32"]
    assert probe_tolerance("bfloat16", "fp32", 12, 10.0) == PROBE_ATOL["bfloat16"]
    # bf16 training: 4 * 2^-8 * sqrt(n_layer) * max(1, scale)
    assert probe_tolerance("float32", "bf16", 12, 10.0) == pytest.approx(4 * 2**-8 * math.sqrt(12) * 10.0)
    assert probe_tolerance("float32", "bf16", 4, 0.5) == pytest.approx(4 * 2**-8 * 2 * 1.0)
    assert probe_tolerance("float32", "fp16", 4, 8.0) == pytest.approx(4 * 2**-11 * 2 * 8.0)
    # deeper models and larger logits get more room; fp16 (11 bits) less than bf16 (8 bits)
    assert probe_tolerance("float32", "bf16", 48, 10.0) > probe_tolerance("float32", "bf16", 12, 10.0)
    assert probe_tolerance("float32", "fp16", 12, 10.0) < probe_tolerance("float32", "bf16", 12, 10.0)
    with pytest.raises(SpecError, match="'int8'"):
        probe_tolerance("int8", "bf16", 2, 1.0)
    with pytest.raises(SpecError, match="precision 'fp8'"):
        probe_tolerance("float32", "fp8", 2, 1.0)


def _checkpoint(tmp_path, precision: str, tamper: bool = False):
    """A model folder (fp32 weights) and a checkpoint folder whose probe logits come from the bf16 copy."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(256)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=256, n_positions=32,
                                       bos_token_id=0, eos_token_id=0)).eval()
    model_dir, ckpt = tmp_path / "model", tmp_path / "ckpt"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    ckpt.mkdir()
    ids = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad():
        recorded = model.to(torch.bfloat16)(input_ids=ids).logits.float()
    if tamper:  # a consolidation that got one row of the embedding wrong
        recorded[0, :, 7] += recorded.abs().max()
    from safetensors.torch import save_file

    save_file({"logits": recorded.contiguous()}, ckpt / layout.CKPT_PROBE_LOGITS)
    (ckpt / layout.CKPT_PROBE_IDS).write_text(json.dumps({"input_ids": ids.tolist()}))
    (ckpt / layout.CKPT_META).write_text(json.dumps({"precision": precision}))
    return model_dir, ckpt


def test_bf16_checkpoint_verifies_at_the_bf16_bound(tmp_path):
    model_dir, ckpt = _checkpoint(tmp_path, "bf16")
    check = verify(model_dir, ckpt)
    assert check["ok"], check
    assert check["train_precision"] == "bf16"
    # the difference is real bf16 rounding: far above the fp32 bound, inside the bf16 one
    assert PROBE_ATOL["float32"] < check["max_abs_logit_diff"] <= check["atol"]


def test_same_logits_refused_when_recorded_as_fp32(tmp_path):
    model_dir, ckpt = _checkpoint(tmp_path, "fp32")
    check = verify(model_dir, ckpt)
    assert not check["ok"] and check["atol"] == PROBE_ATOL["float32"]
    assert "the bound for fp32 training exported as float32" in check["problems"][0]


def test_wrong_weights_refused_under_bf16(tmp_path):
    model_dir, ckpt = _checkpoint(tmp_path, "bf16", tamper=True)
    check = verify(model_dir, ckpt)
    assert not check["ok"] and check["max_abs_logit_diff"] > check["atol"], check
