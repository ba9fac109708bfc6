"""Tiny Hugging Face model folders and a zeroplane local head for the serving tests (built from a
config, never downloaded)."""

from __future__ import annotations

import contextlib
import socket
from typing import Iterator

CORPUS = ["the quick brown fox jumps over the lazy dog.", "ray serve answers requests in batches."] * 40


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_version(path, seed: int, n_positions: int = 64) -> str:
    """A 2-layer GPT-2 + trained BPE tokenizer saved as a Hugging Face folder at ``path`` (weights differ
    by ``seed``; the eos embedding is zeroed so that greedy decoding never stops early; a context of
    ``n_positions`` tokens)."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=n_positions,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        model.transformer.wte.weight[tok.eos_token_id].zero_()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@contextlib.contextmanager
def local_head(tmp, num_cpus: int = 4) -> Iterator[None]:
    """A zeroplane local head with its own ZEROPLANE_HOME and Ray token file under ``tmp``, ended (only
    what it started) on exit; the environment is restored."""
    import pytest

    from zeroplane import cluster

    mp = pytest.MonkeyPatch()
    mp.setenv("ZEROPLANE_HOME", str(tmp / "home"))
    mp.setenv("RAY_AUTH_TOKEN_PATH", str(tmp / "ray-auth-token"))
    for var in ("RAY_ADDRESS", "ZEROPLANE_SERVE_PORT", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        mp.delenv(var, raising=False)
    try:
        cluster.start_local_head(num_cpus=num_cpus, dashboard_port=free_port(), serve_http_port=free_port(),
                                 timeout_s=180)
        yield
    finally:
        try:
            cluster.stop_local_head()
        finally:
            mp.undo()
            cluster._refresh_ray_auth_cache()
