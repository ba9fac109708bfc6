"""The deterministic batch order and the tokenizer/sequence split (a tiny BPE trained in the test)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from zeroplane.errors import SpecError
from zeroplane.runtime.train.data import EOS, BatchOrder, tokenize_split, train_bpe_tokenizer


def _stream(n: int, micro: int, world: int, seed: int, num_micro_batches: int) -> np.ndarray:
    """Concatenate global micro-batches k = 0.. in (k, rank) order: the global stream positions."""
    orders = [BatchOrder(n, micro, world, r, seed) for r in range(world)]
    return np.concatenate([orders[r].indices(k) for k in range(num_micro_batches) for r in range(world)])


# ---------------------------------------------------------------- BatchOrder


def test_every_sequence_exactly_once_per_epoch_across_ranks():
    n, micro, world = 10, 3, 2
    stream = _stream(n, micro, world, seed=0, num_micro_batches=20)  # 120 positions = 12 epochs
    assert stream.shape == (120,)
    epochs = stream.reshape(-1, n)
    for e, chunk in enumerate(epochs):
        assert sorted(chunk.tolist()) == list(range(n)), f"epoch {e}: {chunk}"
    # epochs are reshuffled, not repeated
    assert len({tuple(c) for c in epochs.tolist()}) > 1


def test_stream_is_the_documented_concatenation_of_permutations():
    n, micro, world, seed = 10, 3, 2, 5
    stream = _stream(n, micro, world, seed, num_micro_batches=10)
    expected = np.concatenate([np.random.default_rng(seed + e).permutation(n) for e in range(6)])
    assert stream.tolist() == expected.tolist()


def test_ranks_are_disjoint_within_a_micro_batch():
    n, micro, world = 10, 3, 2
    r0, r1 = BatchOrder(n, micro, world, 0, 0), BatchOrder(n, micro, world, 1, 0)
    checked = 0
    for k in range(30):
        first, last = k * world * micro, (k + 1) * world * micro - 1
        if first // n != last // n:
            continue  # this global micro-batch straddles an epoch boundary
        a, b = r0.indices(k), r1.indices(k)
        assert len(set(a)) == micro and len(set(b)) == micro
        assert not set(a) & set(b), (k, a, b)
        checked += 1
    assert checked >= 10
    # when the global batch divides n, every micro-batch is disjoint across all ranks
    n, micro, world = 12, 3, 4
    orders = [BatchOrder(n, micro, world, r, 1) for r in range(world)]
    for k in range(9):
        all_idx = np.concatenate([o.indices(k) for o in orders])
        assert sorted(all_idx.tolist()) == list(range(n))


def test_indices_shape_dtype_and_range():
    idx = BatchOrder(10, 3, 2, 1, 0).indices(4)
    assert idx.shape == (3,) and idx.dtype == np.int64
    assert ((0 <= idx) & (idx < 10)).all()


def test_deterministic():
    a = [BatchOrder(10, 3, 2, 1, 7).indices(k).tolist() for k in range(12)]
    b = [BatchOrder(10, 3, 2, 1, 7).indices(k).tolist() for k in range(12)]
    assert a == b
    c = [BatchOrder(10, 3, 2, 1, 8).indices(k).tolist() for k in range(12)]
    assert a != c  # the seed matters
    d = [BatchOrder(10, 3, 2, 0, 7).indices(k).tolist() for k in range(12)]
    assert a != d  # so does the rank


def test_resuming_at_k_equals_continuing():
    n, micro, world, rank, seed = 10, 3, 2, 1, 3
    cont = BatchOrder(n, micro, world, rank, seed)
    uninterrupted = [cont.indices(k).tolist() for k in range(25)]
    for resume_at in (1, 4, 7, 13):
        fresh = BatchOrder(n, micro, world, rank, seed)  # a new process after a restart
        assert [fresh.indices(k).tolist() for k in range(resume_at, 25)] == uninterrupted[resume_at:]
    # asking out of order (e.g. evaluation peeking ahead) does not disturb the order
    o = BatchOrder(n, micro, world, rank, seed)
    o.indices(20)
    assert [o.indices(k).tolist() for k in range(25)] == uninterrupted


def test_crosses_epoch_boundary():
    n, micro, world, seed = 10, 3, 2, 0
    perm0 = np.random.default_rng(seed).permutation(n)
    perm1 = np.random.default_rng(seed + 1).permutation(n)
    # global micro-batch 1: rank 0 takes positions 6..8 (epoch 0), rank 1 takes 9 (epoch 0), 10, 11 (epoch 1)
    assert BatchOrder(n, micro, world, 0, seed).indices(1).tolist() == perm0[6:9].tolist()
    assert BatchOrder(n, micro, world, 1, seed).indices(1).tolist() == [perm0[9], perm1[0], perm1[1]]
    assert BatchOrder(n, micro, world, 0, seed).indices(2).tolist() == perm1[2:5].tolist()


def test_epoch_of():
    o = BatchOrder(10, 3, 2, 0, 0)
    assert o.epoch_of(0) == pytest.approx(0.6)
    assert o.epoch_of(4) == pytest.approx(3.0)


def test_micro_larger_than_n_wraps_through_epochs():
    o = BatchOrder(4, 6, 1, 0, 0)
    first = o.indices(0).tolist()
    perm0 = np.random.default_rng(0).permutation(4).tolist()
    perm1 = np.random.default_rng(1).permutation(4).tolist()
    assert first == perm0 + perm1[:2]


# ---------------------------------------------------------------- tokenizer and split


@pytest.fixture(scope="module")
def text() -> str:
    from pydoc_data.topics import topics

    return EOS.join(topics[k] for k in sorted(topics))[:8000]


@pytest.fixture(scope="module")
def tok(text):
    return train_bpe_tokenizer(text, vocab_size=300)


def test_trained_tokenizer_has_eos_and_no_pad(tok, text):
    assert tok.eos_token == EOS == "<|endoftext|>"
    assert tok.eos_token_id is not None
    assert tok.convert_tokens_to_ids(EOS) == tok.eos_token_id
    assert tok.pad_token is None and tok.pad_token_id is None
    assert len(tok) <= 300 and len(tok) > 256  # bytes + special token + some merges
    ids = tok(text[:500], add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text[:500]  # byte-level: lossless round trip
    assert tok(EOS, add_special_tokens=False)["input_ids"] == [tok.eos_token_id]


def test_tokenize_split_shapes_and_tail(tok, text):
    seq_len, frac = 16, 0.1
    train, val = tokenize_split(tok, text, seq_len, frac)
    assert train.dtype == np.int32 and val.dtype == np.int32
    assert train.ndim == 2 and val.ndim == 2
    assert train.shape[1] == seq_len and val.shape[1] == seq_len
    assert train.shape[0] >= 1 and val.shape[0] >= 1

    ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"], dtype=np.int32)
    n_val_tokens = max(int(len(ids) * frac), seq_len)
    assert train.shape[0] == (len(ids) - n_val_tokens) // seq_len
    assert val.shape[0] == n_val_tokens // seq_len
    # train is the head of the stream, val starts where the held-out tail starts
    assert train.ravel().tolist() == ids[: train.size].tolist()
    tail_start = len(ids) - n_val_tokens
    assert val.ravel().tolist() == ids[tail_start: tail_start + val.size].tolist()
    # no token position is in both
    assert train.size <= tail_start


def test_tokenize_split_val_gets_at_least_one_sequence(tok, text):
    seq_len = 32
    train, val = tokenize_split(tok, text[:3000], seq_len, 0.01)  # 1% would be less than one sequence
    assert val.shape == (1, seq_len)
    assert train.shape[0] >= 1


def test_tokenize_split_too_little_text_names_seq_len(tok):
    with pytest.raises(SpecError) as ei:
        tokenize_split(tok, "def f(): return 1", 64, 0.05)
    msg = ei.value.message
    assert "seq_len=64" in msg and "data.seq_len" in msg
    assert ei.value.exit_code == 2


def test_tokenize_split_needs_one_training_sequence_too(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    seq_len = 256
    just_val = tok.decode(ids[: seq_len + 10])  # enough for validation, not for training as well
    with pytest.raises(SpecError, match=r"give 0 training and 1 validation"):
        tokenize_split(tok, just_val, seq_len, 0.05)


# ---------------------------------------------------------------- tokenizer cache (driver)


def _cache_files(storage) -> list:
    return sorted(storage.listdir(storage.path("cache", "tokenizers")))


def test_bpe_cache_miss_then_hit_gives_the_same_tokenizer(tmp_path, text, capsys):
    from zeroplane.runtime.train.data import tokenizer_files
    from zeroplane.runtime.train.data import cached_bpe_tokenizer
    from zeroplane.spec.model import TrainBPE
    from zeroplane.storage import Storage

    storage = Storage.from_uri(str(tmp_path / "store"))
    settings = TrainBPE(vocab_size=300, min_frequency=2)
    first, files1, origin1 = cached_bpe_tokenizer(storage, settings, text)
    assert origin1.startswith("BPE trained")
    assert len(_cache_files(storage)) == 1
    second, files2, origin2 = cached_bpe_tokenizer(storage, settings, text)
    assert origin2.startswith("BPE from cache")
    assert files2 == files1 == tokenizer_files(first)  # what a job saves with its checkpoints
    assert second.get_vocab() == first.get_vocab()
    assert (second.bos_token, second.eos_token, second.unk_token, second.pad_token, len(second)) == \
        (first.bos_token, first.eos_token, first.unk_token, None, len(first))
    assert second(text[:500])["input_ids"] == first(text[:500])["input_ids"]
    # other text or other settings: a new entry, not the cached tokenizer
    _, _, origin3 = cached_bpe_tokenizer(storage, TrainBPE(vocab_size=320, min_frequency=2), text)
    _, _, origin4 = cached_bpe_tokenizer(storage, settings, text[:-1])
    assert origin3.startswith("BPE trained") and origin4.startswith("BPE trained")
    assert len(_cache_files(storage)) == 3


def test_damaged_bpe_cache_entry_is_retrained_and_rewritten(tmp_path, text, capsys):
    from zeroplane.runtime.train.data import cached_bpe_tokenizer
    from zeroplane.spec.model import TrainBPE
    from zeroplane.storage import Storage

    storage = Storage.from_uri(str(tmp_path / "store"))
    settings = TrainBPE(vocab_size=300, min_frequency=2)
    _, good, _ = cached_bpe_tokenizer(storage, settings, text)
    (entry,) = _cache_files(storage)
    path = storage.path("cache", "tokenizers", entry)
    partial = json.dumps({"tokenizer.json": good["tokenizer.json"]}).encode()  # config missing
    not_text = json.dumps({**good, "tokenizer_config.json": {"eos_token": None}}).encode()
    for damage in (b'{"tokenizer.json": "{not json', b"", b'{"tokenizer.json": "{}"}', b"[1, 2]", partial, not_text):
        storage.write_bytes(path, damage)
        _, again, origin = cached_bpe_tokenizer(storage, settings, text)
        assert origin.startswith("BPE trained"), damage
        assert "unreadable" in capsys.readouterr().out
        assert again == good
        assert storage.read_json(path) == good  # rewritten whole


def test_bpe_cache_on_s3(s3_bucket, text):
    from zeroplane.runtime.train.data import cached_bpe_tokenizer
    from zeroplane.spec.model import TrainBPE
    from zeroplane.storage import Storage

    storage = Storage.from_uri(f"s3://{s3_bucket}/runs")
    settings = TrainBPE(vocab_size=300, min_frequency=2)
    _, files1, origin1 = cached_bpe_tokenizer(storage, settings, text)
    _, files2, origin2 = cached_bpe_tokenizer(storage, settings, text)
    assert files1 == files2
    assert origin1.startswith("BPE trained") and origin2.startswith("BPE from cache")


def test_make_tokenizer_uses_a_given_folder_and_refuses_no_source(tmp_path, tok, text):
    from zeroplane.runtime.train.data import make_tokenizer, tokenizer_files
    from zeroplane.spec.model import TokenizerSpec
    from zeroplane.storage import Storage

    storage = Storage.from_uri(str(tmp_path / "store"))
    folder = tmp_path / "tok"
    tok.save_pretrained(folder)
    got, files, origin = make_tokenizer(TokenizerSpec(train_bpe=None, path=str(folder)), text, None, storage)
    assert origin == f"tokenizer of {folder}"
    assert got(text[:300])["input_ids"] == tok(text[:300])["input_ids"]
    assert files == tokenizer_files(got)
    assert not storage.exists(storage.path("cache"))  # nothing trained, nothing cached
    with pytest.raises(SpecError, match="tokenizer.train_bpe, tokenizer.path or model.pretrained"):
        make_tokenizer(TokenizerSpec(train_bpe=None), text, None, storage)
