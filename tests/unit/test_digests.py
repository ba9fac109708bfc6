"""Completion markers that cannot bless a damaged file: sizes and SHA-256 recorded before the upload,
checked by whoever reads the bytes (promotion, resume, a replica) and by `serve deploy` before any
replica loads a version. Real files in a tmp folder; the marker writer runs on a real pyarrow filesystem."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from click.testing import CliRunner

from zeroplane.checkpoints import MARKER, check_local_copy, inspect_checkpoint
from zeroplane.cli.main import main
from zeroplane.digests import check_folder, folder_digests
from zeroplane.errors import ZeroplaneError
from zeroplane.registry import VERSION_MARKER, Registry, check_version_folder
from zeroplane.runtime.train.checkpointing import write_marker, write_rank_digests
from zeroplane.storage import Storage

JOB = "tiny-cpu-20250101-000000-abcd"


def _overwrite(path: Path, offset: int = 10, data: bytes = b"\xff" * 64) -> None:
    """Change bytes in place: the file keeps its size (what a size-only marker cannot see)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _rank_folder(root: Path, rank: int, step: int = 5) -> Path:
    d = root / f"rank{rank}"
    tag = f"step_{step:07d}"
    (d / "ds" / tag).mkdir(parents=True)
    (d / "ds" / tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(bytes(range(256)) * (4 + rank))
    (d / "rng").mkdir()
    (d / "rng" / f"rank_{rank}.pt").write_bytes(b"r" * 33)
    if rank == 0:
        (d / "meta.json").write_text(json.dumps({"step": step, "tag": tag, "metrics": {}}))
        (d / "ds" / "latest").write_text(tag)
    return d


class _Persisted:
    """What ``ray.train.get_checkpoint()`` gives rank 0: a filesystem and a path."""

    def __init__(self, path: Path) -> None:
        self.filesystem, self.path = pafs.LocalFileSystem(), str(path)


def _persist(tmp_path: Path, storage: Storage, *, damage=None) -> str:
    """Two ranks write and hash their folders, 'upload' them into one checkpoint, rank 0 writes the marker."""
    ck = Path(storage.path("jobs", JOB, "checkpoint_step_0000005"))
    for rank in (0, 1):
        local = _rank_folder(tmp_path, rank)
        write_rank_digests(str(local), rank)
        shutil.copytree(local, ck, dirs_exist_ok=True)
    if damage:
        damage(ck)
    write_marker(_Persisted(ck), {"step": 5})
    return str(ck)


def test_marker_records_every_ranks_hashes_and_a_clean_copy_passes(tmp_path):
    storage = Storage.from_uri(str(tmp_path / "store"))
    ck = _persist(tmp_path, storage)
    marker = json.loads(Path(ck, MARKER).read_text())
    assert marker["format"] == 2
    shard = "ds/step_0000005/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    assert marker["sha256"][shard] == hashlib.sha256(Path(ck, shard).read_bytes()).hexdigest()
    assert set(marker["sha256"]) == {r for r in marker["files"] if not r.startswith("digests/")}
    assert inspect_checkpoint(storage, JOB, ck).complete
    copy = storage.download_dir(ck, tmp_path / "copy")
    assert check_local_copy(storage, ck, str(copy)) == sum(
        marker["files"][r] for r in marker["sha256"])


def test_a_file_that_landed_short_is_never_blessed(tmp_path):
    storage = Storage.from_uri(str(tmp_path / "store"))
    shard = "ds/step_0000005/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    ck = _persist(tmp_path, storage, damage=lambda d: (d / shard).write_bytes((d / shard).read_bytes()[:100]))
    info = inspect_checkpoint(storage, JOB, ck)
    assert not info.complete and shard in info.reason


def test_a_shard_altered_after_the_marker_is_refused_by_name_on_download(tmp_path):
    storage = Storage.from_uri(str(tmp_path / "store"))
    ck = _persist(tmp_path, storage)
    shard = "ds/step_0000005/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    _overwrite(Path(ck, shard))
    assert inspect_checkpoint(storage, JOB, ck).complete  # a listing sees the same sizes
    copy = storage.download_dir(ck, tmp_path / "copy")
    with pytest.raises(ZeroplaneError) as e:
        check_local_copy(storage, ck, str(copy))
    assert shard in str(e.value) and "SHA-256" in str(e.value) and "checkpoint" in str(e.value)


def test_check_folder_names_missing_and_resized_files(tmp_path):
    d = tmp_path / "f"
    d.mkdir()
    (d / "a").write_bytes(b"aaaa")
    (d / "b").write_bytes(b"bbbb")
    digests = folder_digests(d)
    expected = {r: v["sha256"] for r, v in digests.items()}
    sizes = {r: v["size"] for r, v in digests.items()}
    (d / "a").unlink()
    (d / "b").write_bytes(b"bb")
    with pytest.raises(ZeroplaneError) as e:
        check_folder(d, expected, "thing", sizes=sizes)
    assert "a (missing)" in str(e.value) and "b (2 bytes, marker says 4)" in str(e.value)


def _hf_folder(tmp_path: Path) -> Path:
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 16)
    (d / "tokenizer.json").write_text("{}")
    return d


def test_a_version_records_sizes_hashes_and_timings(tmp_path):
    storage = Storage.from_uri(str(tmp_path / "store"))
    rec = Registry(storage).register("tiny", _hf_folder(tmp_path), {"source": {"job_id": JOB, "step": 1}})
    assert rec["files"]["model.safetensors"] == 4096
    assert rec["sha256"]["model.safetensors"] == hashlib.sha256(bytes(range(256)) * 16).hexdigest()
    assert rec["registration"]["bytes"] == sum(rec["files"].values())
    assert rec["registration"]["hash_s"] >= 0 and rec["registration"]["upload_s"] >= 0
    folder = Registry(storage).version_dir("tiny", "v1")
    Registry(storage).check_files(Registry(storage).get("tiny", "v1"))
    assert check_version_folder(folder, "tiny:v1") == sum(rec["files"].values())


@pytest.mark.parametrize("damage", ["overwritten", "truncated"])
def test_a_damaged_version_is_refused_before_any_replica_loads_it(tmp_path, damage):
    store = tmp_path / "store"
    storage = Storage.from_uri(str(store))
    Registry(storage).register("tiny", _hf_folder(tmp_path), {"source": {"job_id": JOB, "step": 1}})
    weights = Path(Registry(storage).version_dir("tiny", "v1"), "model.safetensors")
    if damage == "overwritten":
        _overwrite(weights)
    else:
        weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ZeroplaneError, match="model.safetensors"):
        check_version_folder(weights.parent, "tiny:v1")
    # `serve deploy` stops at the check: no cluster is asked for (there is none here)
    result = CliRunner().invoke(main, ["serve", "deploy", "tiny:v1", "--storage", str(store)])
    assert result.exit_code == 1, result.output
    assert "model.safetensors" in result.output and "does not match its completion marker" in result.output
    assert "cluster" not in result.output.lower()


def test_a_plain_folder_without_a_marker_is_loaded_unchecked(tmp_path):
    assert check_version_folder(_hf_folder(tmp_path), "plain") == 0
    assert not (tmp_path / "hf" / VERSION_MARKER).exists()


def test_a_replica_refuses_an_altered_version_on_load(tmp_path):
    from zeroplane.runtime.serve.server import fetch_model

    storage = Storage.from_uri(str(tmp_path / "store"))
    Registry(storage).register("tiny", _hf_folder(tmp_path), {"source": {"job_id": JOB, "step": 1}})
    folder = Registry(storage).version_dir("tiny", "v1")
    assert fetch_model(folder) == (folder, None)
    _overwrite(Path(folder, "model.safetensors"))
    with pytest.raises(ZeroplaneError, match=r"model.safetensors \(SHA-256 differs"):
        fetch_model(folder)


def test_a_damaged_json_file_is_named_and_never_written_over(tmp_path):
    """One kind of failure, everywhere a stored JSON file is read: the history of rollouts, the API keys, a
    dataset's manifest. A history that no longer parses is refused by name (not read as empty, then replaced
    by the next rollout); a dataset whose manifest is damaged counts as unfinished and is prepared again."""
    from zeroplane import datasets as dsets
    from zeroplane.errors import DamagedFileError
    from zeroplane.releases import History
    from zeroplane.storage import Storage

    st = Storage.from_uri(str(tmp_path))
    history = History(st, "m1")
    Path(history.path).parent.mkdir(parents=True)
    Path(history.path).write_text('[{"id": 1, "outcome": "running"')
    with pytest.raises(DamagedFileError, match=r"m1\.json is not valid JSON .*restore it from a backup"):
        history.entries()
    with pytest.raises(DamagedFileError):
        history.append({"command": "serve deploy m1:v2"})
    assert Path(history.path).read_text() == '[{"id": 1, "outcome": "running"'  # untouched
    ds = "0" * dsets.FINGERPRINT_CHARS
    manifest = Path(st.path(dsets.dataset_dir(ds), dsets.MANIFEST))
    manifest.parent.mkdir(parents=True)
    for damaged in ("{not json", "[]"):
        manifest.write_text(damaged)
        assert dsets.read_manifest(st, ds) is None
        assert [(d.id, d.complete) for d in dsets.list_datasets(st)] == [(ds, False)]
