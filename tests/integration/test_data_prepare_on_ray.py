"""Data preparation with Ray Data on a real local Ray: shards equal a single-process tokenization of the
same files, a prepared dataset is reused, an unfinished one is completed, bad input fails before any
worker starts, and a Parquet source works; local storage (the S3 path is in test_data_s3.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from zeroplane import datasets as dsets
from zeroplane.errors import SpecError
from zeroplane.spec import load_spec
from zeroplane.storage import Storage

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _spec(source, storage, *extra: str):
    return load_spec(REPO / "jobs" / "tiny-cpu.yaml",
                     [f"data.source={source}", f"checkpoint.storage_path={storage}", "data.max_chars=null",
                      "data.validation_fraction=0.2", "data.shard_tokens=1024", *extra])


def _corpus(folder: Path) -> None:
    """Three JSONL files (plain, gzip, zstd) and a .txt: ~60 k characters of varied text."""
    rng = np.random.default_rng(0)
    words = "data shard token worker rank epoch resume manifest cluster storage stream batch".split()

    def doc(i):
        return f"Document {i}. " + " ".join(rng.choice(words, size=int(rng.integers(20, 80))))

    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": doc(i), "id": i}) for i in range(300)]
    (folder / "a.jsonl").write_text("\n".join(lines[:100]) + "\n")
    for name, codec, part in (("b.jsonl.gz", "gzip", lines[100:200]), ("c.jsonl.zst", "zstd", lines[200:])):
        with pa.CompressedOutputStream(str(folder / name), codec) as f:
            f.write(("\n".join(part) + "\n").encode())
    (folder / "d.txt").write_text("\n\n".join(doc(1000 + i) for i in range(40)))


def _expected_streams(files, text_field, fraction, tokenizer_files):
    """The train / validation streams a single process makes of ``files`` (same rules, no Ray)."""
    from zeroplane.runtime.train.data import bpe_tokenizer_from_files
    from zeroplane.runtime.train.prepare import documents_of_file, is_validation

    tok = bpe_tokenizer_from_files(tokenizer_files)
    out = {"train": [], "val": []}
    for f in files:
        docs, _ = documents_of_file(f.path, Path(f.path).read_bytes(), text_field, "fail")
        for d in docs:
            for j, part in enumerate(d):
                ids = tok.encode(part) + ([tok.eos_token_id] if j == len(d) - 1 else [])
                out["val" if is_validation(part, fraction) else "train"].extend(ids)
    return out


def _stream(storage, ds, split):
    folder = Path(ds.path)
    return np.concatenate([np.fromfile(folder / s["file"], dtype="<u2") for s in ds.manifest["splits"][split]["shards"]])


def test_prepare_equals_single_process_then_reuses_and_completes(ray_local, tmp_path):
    from zeroplane.runtime.train.prepare import ensure_dataset

    _corpus(tmp_path / "corpus")
    spec = _spec(tmp_path / "corpus", tmp_path / "store")
    storage = Storage.for_checkpoint_spec(spec.checkpoint)
    lines = []
    ds = ensure_dataset(spec, storage, log=lines.append)
    assert not ds.reused and "preparing dataset" in lines[0] and "prepared dataset" in lines[-1]
    m = ds.manifest
    _, files = dsets.list_source(str(tmp_path / "corpus"))
    assert [f["path"] for f in m["source"]["files"]] == [f.path for f in files] and len(files) == 4
    want = _expected_streams(files, "text", 0.2, ds.tokenizer_files)
    for split in ("train", "val"):
        got = _stream(storage, ds, split)
        assert got.tolist() == want[split], split
        assert m["splits"][split]["tokens"] == len(got)
        assert all(s["tokens"] == 1024 for s in m["splits"][split]["shards"][:-1])
    assert len(m["splits"]["train"]["shards"]) > 3 and m["counts"]["documents"] == 300 + 40
    assert m["dtype"] == "uint16" and 256 < m["tokenizer"]["vocab_size"] <= 512

    # reuse: nothing rewritten
    before = {p.name: p.stat().st_mtime_ns for p in Path(ds.path).iterdir()}
    again = ensure_dataset(spec, storage, log=lines.append)
    assert again.reused and again.id == ds.id and "reusing prepared dataset" in lines[-1]
    assert {p.name: p.stat().st_mtime_ns for p in Path(ds.path).iterdir()} == before

    # a preparation killed before its manifest: never used, the next run completes it with the same bytes
    shard = Path(ds.path) / "train-00001.bin"
    good = shard.read_bytes()
    shard.write_bytes(good[:10])
    (Path(ds.path) / dsets.MANIFEST).unlink()
    assert [(d.id, d.complete) for d in dsets.list_datasets(storage)] == [(ds.id, False)]
    third = ensure_dataset(spec, storage, log=lines.append)
    assert not third.reused and "completing an unfinished preparation" in lines[-2]
    assert shard.read_bytes() == good and third.manifest["splits"] == m["splits"]

    # another seq_len is the same dataset; another fraction is another
    assert ensure_dataset(_spec(tmp_path / "corpus", tmp_path / "store", "data.seq_len=32"), storage).id == ds.id
    assert dsets.fingerprint(_spec(tmp_path / "corpus", tmp_path / "store", "data.validation_fraction=0.3"),
                             files) != ds.id


@pytest.mark.parametrize("bad, setting, message", [
    (b'{"text": "fine"}\n{"text": "cut off\n', "fail", r"bad.jsonl: line 2: not JSON"),
    (b'{"body": "no text here"}\n', "fail", r"bad.jsonl: line 1: no field 'text'"),
    (b"", "fail", r"bad.jsonl: empty file"),
])
def test_bad_input_fails_before_any_worker_naming_file_and_line(ray_local, tmp_path, bad, setting, message):
    from zeroplane.runtime.train.driver import build_train_loop_config

    _corpus(tmp_path / "corpus")
    (tmp_path / "corpus" / "bad.jsonl").write_bytes(bad)
    spec = _spec(tmp_path / "corpus", tmp_path / "store", f"data.on_bad_record={setting}")
    storage = Storage.for_checkpoint_spec(spec.checkpoint)
    with pytest.raises(SpecError, match=message) as e:
        build_train_loop_config(spec, "itest-bad-data", storage)
    assert "\n" not in e.value.message and str(tmp_path) in e.value.message
    assert not any(d.complete for d in dsets.list_datasets(storage))  # nothing half-written is ever used


def test_skip_setting_counts_bad_lines_and_invalid_utf8(ray_local, tmp_path):
    from zeroplane.runtime.train.driver import build_train_loop_config

    _corpus(tmp_path / "corpus")
    (tmp_path / "corpus" / "bad.jsonl").write_bytes(b'{"text": "caf\xe9"}\n{oops\n{"x": 1}\n')
    (tmp_path / "corpus" / "empty.txt").write_bytes(b"")
    spec = _spec(tmp_path / "corpus", tmp_path / "store", "data.on_bad_record=skip")
    storage = Storage.for_checkpoint_spec(spec.checkpoint)
    config = build_train_loop_config(spec, "itest-skip", storage)
    m = dsets.show_dataset(storage, config["dataset"]["id"])
    assert {k: m["counts"][k] for k in ("skipped_records", "empty_files", "replaced_chars", "invalid_utf8_files")} == {
        "skipped_records": 2, "empty_files": 1, "replaced_chars": 1, "invalid_utf8_files": 1}
    assert "train" not in config and "val" not in config  # the loop config carries the location, not tokens
    assert config["dataset"]["folder"] == storage.path("datasets", config["dataset"]["id"])


def test_too_little_text_and_no_source_fail_clearly(ray_local, tmp_path):
    from zeroplane.runtime.train.driver import build_train_loop_config

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "one.jsonl").write_text("\n".join(json.dumps({"text": f"line {i} of text"}) for i in range(40)))
    storage = Storage.from_uri(str(tmp_path / "store"))
    with pytest.raises(SpecError, match=r"sequences of seq_len=64; lower data.seq_len or give more text"):
        build_train_loop_config(_spec(tmp_path / "c", tmp_path / "store"), "itest-short", storage)
    with pytest.raises(SpecError, match=r"matches no file"):
        build_train_loop_config(_spec(tmp_path / "c" / "*.parquet", tmp_path / "store"), "itest-none", storage)


def test_parquet_source(ray_local, tmp_path):
    from zeroplane.runtime.train.prepare import ensure_dataset

    folder = tmp_path / "pq"
    folder.mkdir()
    texts = [f"Row {i}: " + "parquet column text " * (i % 7 + 1) for i in range(600)]
    pq.write_table(pa.table({"text": texts[:300], "n": list(range(300))}), folder / "a.parquet", row_group_size=50)
    pq.write_table(pa.table({"text": texts[300:], "n": list(range(300))}), folder / "b.parquet", row_group_size=50)
    spec = _spec(folder, tmp_path / "store")
    ds = ensure_dataset(spec, Storage.for_checkpoint_spec(spec.checkpoint))
    assert ds.manifest["counts"]["documents"] == 600
    from zeroplane.runtime.train.data import bpe_tokenizer_from_files
    from zeroplane.runtime.train.prepare import is_validation

    tok = bpe_tokenizer_from_files(ds.tokenizer_files)
    want = [t for x in texts if not is_validation(x, 0.2) for t in tok.encode(x) + [tok.eos_token_id]]
    assert _stream(None, ds, "train").tolist() == want
    assert os.path.basename(ds.path) == ds.id
