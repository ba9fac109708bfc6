"""Data preparation without a cluster: documents of a file, the validation hash, tokenized rows, shards
read back across shard boundaries, the fingerprint and the source listing (real files, a real BPE)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from zeroplane import datasets as dsets
from zeroplane.errors import SpecError
from zeroplane.runtime.train.data import EOS, TokenSequences, train_bpe_tokenizer
from zeroplane.runtime.train.prepare import (ShardWriter, documents_of_file, is_validation, paragraphs,
                                             tokenize_documents, tokenizer_sample)
from zeroplane.spec import load_spec
from zeroplane.storage import Storage

REPO = Path(__file__).resolve().parents[2]


def _compressed(raw: bytes, codec: str) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, codec) as f:
        f.write(raw)
    return sink.getvalue().to_pybytes()


# ---------------------------------------------------------------- documents


def test_paragraphs_keep_every_character():
    text = "one\n\ntwo\n  \n\nthree\nstill three\n\n"
    parts = paragraphs(text)
    assert parts == ["one\n\n", "two\n  \n\n", "three\nstill three\n\n"]
    assert "".join(parts) == text and paragraphs("") == []


def test_validation_hash_is_per_document_and_near_the_fraction():
    docs = [f"document number {i}" for i in range(20000)]
    chosen = [is_validation(d, 0.1) for d in docs]
    assert chosen == [is_validation(d, 0.1) for d in docs]  # a pure function of the text
    assert 1700 < sum(chosen) < 2300  # 2000 expected, sd 42
    # growing the corpus never moves a document between splits
    assert [is_validation(d, 0.1) for d in docs[:100]] == chosen[:100]


@pytest.mark.parametrize("codec", [None, "gzip", "zstd"])
def test_jsonl_documents_plain_and_compressed(codec):
    raw = b'{"text": "first"}\n\n{"text": "second", "id": 2}\n'
    name = "c.jsonl" + {None: "", "gzip": ".gz", "zstd": ".zst"}[codec]
    docs, counts = documents_of_file(name, _compressed(raw, codec) if codec else raw, "text", "fail")
    assert docs == [["first"], ["second"]]
    assert counts == {"replaced_chars": 0, "skipped_records": 0, "empty_files": 0, "invalid_utf8_files": 0}


@pytest.mark.parametrize("line, problem", [
    (b"{not json", "not JSON"),
    (b'{"body": "x"}', "no field 'text'"),
    (b'{"text": 3}', "field 'text' is int, not a string"),
    (b'["text"]', "no field 'text'"),
])
def test_bad_jsonl_line_names_file_and_line_or_is_skipped(line, problem):
    raw = b'{"text": "ok"}\n' + line + b'\n{"text": "also ok"}\n'
    with pytest.raises(SpecError) as e:
        documents_of_file("/data/part-1.jsonl", raw, "text", "fail")
    assert e.value.message.startswith("/data/part-1.jsonl: line 2: " + problem)
    assert "data.on_bad_record: skip" in e.value.message
    docs, counts = documents_of_file("/data/part-1.jsonl", raw, "text", "skip")
    assert docs == [["ok"], ["also ok"]] and counts["skipped_records"] == 1


def test_invalid_utf8_is_replaced_and_counted():
    docs, counts = documents_of_file("a.txt", b"caf\xe9 and \xff\xfe done", "text", "fail")
    assert docs == [["caf\ufffd and \ufffd\ufffd done"]]
    assert counts["replaced_chars"] == 3 and counts["invalid_utf8_files"] == 1


def test_empty_file_fails_or_is_counted():
    with pytest.raises(SpecError, match=r"^/x/empty.txt: empty file; remove it or set data.on_bad_record: skip"):
        documents_of_file("/x/empty.txt", b" \n\n", "text", "fail")
    assert documents_of_file("/x/empty.txt", b"", "text", "skip") == (
        [], {"replaced_chars": 0, "skipped_records": 0, "empty_files": 1, "invalid_utf8_files": 0})


def test_undecompressable_file_is_named():
    with pytest.raises(SpecError, match=r"^b.jsonl.gz: cannot decompress as gzip"):
        documents_of_file("b.jsonl.gz", b"\x1f\x8b" + b"not a gzip stream after all", "text", "fail")


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer("the quick brown fox jumps over the lazy dog. " * 200, 300)


def test_tokenized_rows_are_the_tokenizers_ids_with_eos_after_each_document(tok):
    docs = [["alpha beta\n\n", "gamma"], ["delta"]]
    table = tokenize_documents(tok.backend_tokenizer.to_str(), tok.eos_token_id, docs, 0.5, {"skipped_records": 4})
    eos = tok.convert_tokens_to_ids(EOS)
    want = [tok.encode("alpha beta\n\n"), tok.encode("gamma") + [eos], tok.encode("delta") + [eos]]
    assert table["ids"].to_pylist() == want
    assert table["val"].to_pylist() == [is_validation(p, 0.5) for p in ("alpha beta\n\n", "gamma", "delta")]
    assert table["chars"].to_pylist() == [12, 5, 5] and table["skipped_records"].to_pylist() == [4, 0, 0]
    empty = tokenize_documents(tok.backend_tokenizer.to_str(), eos, [], 0.5, {"empty_files": 1})
    assert empty["ids"].to_pylist() == [[]] and empty["empty_files"].to_pylist() == [1]


# ---------------------------------------------------------------- shards


def test_sequences_read_across_shard_boundaries_equal_the_stream(tmp_path):
    storage = Storage.from_uri(str(tmp_path))
    stream = np.random.default_rng(0).integers(0, 60000, size=5000)
    w = ShardWriter(storage, "datasets/abc", "train", np.dtype(np.uint16), 1024)
    for chunk in np.array_split(stream, 7):  # documents of any length
        w.add(chunk)
    entry = w.close()
    assert [s["tokens"] for s in entry["shards"]] == [1024] * 4 + [904]
    assert sorted(os.listdir(tmp_path / "datasets" / "abc")) == [f"train-0000{i}.bin" for i in range(5)]
    manifest = {"dtype": "uint16", "splits": {"train": entry}}
    seqs = TokenSequences(storage, storage.path("datasets/abc"), manifest, "train", 100)
    assert len(seqs) == 50  # 5000 // 100; the tail shorter than seq_len is never read
    idx = np.array([10, 0, 49, 20, 30])  # 10: tokens 1000..1100 span shards 0 and 1
    got = seqs[idx]
    assert got.dtype == np.int32 and got.shape == (5, 100)
    assert (got == stream[:5000].reshape(50, 100)[idx]).all()
    with pytest.raises(IndexError):
        seqs[np.array([50])]


# ---------------------------------------------------------------- source and fingerprint


def _spec(source: str, *extra: str):
    return load_spec(REPO / "jobs" / "tiny-cpu.yaml", [f"data.source={source}", "data.max_chars=null", *extra])


def test_source_listing_folder_glob_and_errors(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.jsonl", "sub/b.txt", "sub/c.jsonl.gz", "notes.md"):
        (tmp_path / name).write_bytes(b"x")
    _, files = dsets.list_source(str(tmp_path))
    assert [Path(f.path).relative_to(tmp_path).as_posix() for f in files] == ["a.jsonl", "sub/b.txt", "sub/c.jsonl.gz"]
    assert [f.kind for f in files] == ["jsonl", "txt", "jsonl"]
    _, files = dsets.list_source(str(tmp_path / "sub" / "*"))
    assert [Path(f.path).name for f in files] == ["b.txt", "c.jsonl.gz"]
    with pytest.raises(SpecError, match="matches no file"):
        dsets.list_source(str(tmp_path / "nothing-*.jsonl"))
    with pytest.raises(SpecError, match=r"notes.md' is not one of \.txt, \.jsonl"):
        dsets.list_source(str(tmp_path / "notes.md"))


def test_fingerprint_follows_source_tokenizer_and_settings_not_seq_len(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps({"text": "hello"}) + "\n")

    def fp(*extra):
        spec = _spec(str(f), *extra)
        return dsets.fingerprint(spec, dsets.list_source(spec.data.source)[1])

    base = fp()
    assert len(base) == dsets.FINGERPRINT_CHARS and base == fp()
    assert fp("data.seq_len=128", "train.max_steps=10", "scaling.num_workers=1") == base  # read-time settings
    for change in ("data.validation_fraction=0.1", "tokenizer.train_bpe.vocab_size=600", "data.shard_tokens=4096",
                   "data.on_bad_record=skip", "data.text_field=body", "data.tokenizer_sample_chars=20000"):
        assert fp(change) != base, change
    os.utime(f, ns=(1, 1))  # touched: another dataset
    assert fp() != base


def test_tokenizer_sample_is_bounded_and_spread_over_files(tmp_path):
    for i in range(40):
        (tmp_path / f"part-{i:02d}.jsonl").write_text(
            "".join(json.dumps({"text": f"file{i:02d} " + "word " * 50}) + "\n" for _ in range(100)))
    spec = _spec(str(tmp_path), "data.tokenizer_sample_chars=32000")
    fs, files = dsets.list_source(spec.data.source)
    sample = tokenizer_sample(spec.data, fs, files)
    assert len(sample) <= 32000
    seen = {i for i in range(40) if f"file{i:02d}" in sample}
    assert {0, 39} <= seen and len(seen) == 32  # SAMPLE_FILES files, first and last included
    assert sample == tokenizer_sample(spec.data, fs, files)
    limited = _spec(str(tmp_path), "data.max_chars=5000")
    first = tokenizer_sample(limited.data, fs, files)
    assert len(first) <= 5000 and "file00" in first and "file01" not in first


def test_dataset_ids_are_checked_before_they_become_paths(tmp_path):
    storage = Storage.from_uri(str(tmp_path))
    for bad in ("../x", "ABC", "", "a/b"):
        with pytest.raises(SpecError, match="dataset id"):
            dsets.show_dataset(storage, bad)
    from zeroplane.errors import NotFoundError

    with pytest.raises(NotFoundError, match="does not exist"):
        dsets.show_dataset(storage, "abc123")
    (tmp_path / "datasets" / "abc123").mkdir(parents=True)
    with pytest.raises(NotFoundError, match="unfinished"):
        dsets.show_dataset(storage, "abc123")
    assert [(d.id, d.complete) for d in dsets.list_datasets(storage)] == [("abc123", False)]
