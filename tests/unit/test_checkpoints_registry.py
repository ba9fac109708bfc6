"""Checkpoint completeness, the model registry and local storage, on a real tmp folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from zeroplane.checkpoints import (
    MARKER,
    build_marker,
    dir_name_for_step,
    inspect_checkpoint,
    latest_complete,
    list_checkpoints,
    step_of,
    tag_for_step,
)
from zeroplane.errors import NotFoundError, SpecError, ZeroplaneError
from zeroplane.registry import VERSION_MARKER, Registry, check_model_name, parse_ref
from zeroplane.storage import Storage

JOB = "tiny-cpu-20250101-000000-abcd"


@pytest.fixture
def storage(tmp_path) -> Storage:
    return Storage.from_uri(str(tmp_path / "store"))


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Path(path).write_bytes(data)


def make_checkpoint(storage: Storage, step: int, *, marker: bool = True, dir_name: str | None = None,
                    metrics: dict | None = None) -> str:
    """A fake checkpoint folder with shards, hf files and meta.json; the marker (if any) written last."""
    ck = storage.path("jobs", JOB, dir_name or dir_name_for_step(step))
    tag = tag_for_step(step)
    metrics = metrics if metrics is not None else {"train_loss": 5.0 - step / 100, "val_loss": 5.5 - step / 100}
    _write(f"{ck}/ds/{tag}/mp_rank_00_model_states.pt", b"m" * (100 + step))
    _write(f"{ck}/ds/{tag}/zero_pp_rank_0_mp_rank_00_optim_states.pt", b"o" * 64)
    _write(f"{ck}/ds/{tag}/zero_pp_rank_1_mp_rank_00_optim_states.pt", b"o" * 65)
    _write(f"{ck}/ds/latest", tag.encode())
    _write(f"{ck}/hf/config.json", b'{"model_type": "gpt2"}')
    meta = {"step": step, "tag": tag, "metrics": metrics, "created_at": f"2025-01-01T00:00:{step % 60:02d}Z"}
    storage.write_json(f"{ck}/meta.json", meta)
    if marker:
        files = storage.list_files(ck)
        assert MARKER not in files
        storage.write_json(f"{ck}/{MARKER}", build_marker(files, meta))
    return ck


# ---------------------------------------------------------------- naming


def test_tags_and_dir_names_sort_in_step_order():
    assert tag_for_step(100) == "step_0000100"
    assert dir_name_for_step(7) == "checkpoint_step_0000007"
    assert step_of("checkpoint_step_0000100") == 100
    assert step_of(dir_name_for_step(12345)) == 12345
    assert step_of("checkpoint_tmp") is None
    assert step_of("step_0000100") is None
    assert step_of("zeroplane_result.json") is None
    names = [dir_name_for_step(s) for s in (9, 10, 100, 2)]
    assert [step_of(n) for n in sorted(names)] == [2, 9, 10, 100]


def test_build_marker_lists_files_and_meta():
    m = build_marker({"b": 2, "a": 1}, {"step": 5, "tag": "step_0000005", "metrics": {"val_loss": 1.0},
                                        "created_at": "t", "other": "ignored"})
    assert m == {"format": 1, "step": 5, "tag": "step_0000005", "metrics": {"val_loss": 1.0}, "created_at": "t",
                 "files": {"a": 1, "b": 2}, "sha256": {}}
    assert list(m["files"]) == ["a", "b"]
    json.dumps(m)


# ---------------------------------------------------------------- completeness


def test_list_checkpoints_returns_complete_ones_in_step_order(storage):
    for step in (100, 20, 3):
        make_checkpoint(storage, step)
    cks = list_checkpoints(storage, JOB)
    assert [c.step for c in cks] == [3, 20, 100]
    assert all(c.complete and c.reason == "" and c.job_id == JOB for c in cks)
    c = cks[-1]
    assert c.metrics == {"train_loss": 4.0, "val_loss": 4.5}
    assert c.created_at == "2025-01-01T00:00:40Z"
    assert c.uri == storage.path("jobs", JOB, dir_name_for_step(100))
    assert c.size_bytes == sum(storage.list_files(c.path).values())
    assert c.to_dict()["step"] == 100 and c.to_dict()["complete"] is True


def test_steps_sort_numerically_not_by_name(storage):
    # an unpadded folder name still sorts by its step
    make_checkpoint(storage, 100)
    make_checkpoint(storage, 20, dir_name="checkpoint_step_20")
    assert [c.step for c in list_checkpoints(storage, JOB)] == [20, 100]
    assert latest_complete(storage, JOB).step == 100


def test_checkpoint_without_marker_is_excluded(storage):
    make_checkpoint(storage, 10)
    make_checkpoint(storage, 20, marker=False)
    assert [c.step for c in list_checkpoints(storage, JOB)] == [10]
    everything = list_checkpoints(storage, JOB, include_incomplete=True)
    assert [(c.step, c.complete) for c in everything] == [(10, True), (20, False)]
    assert "no completion marker" in everything[1].reason
    assert everything[1].metrics == {}


def test_marker_listing_a_missing_file_is_excluded(storage):
    ck = make_checkpoint(storage, 10)
    os.remove(f"{ck}/ds/{tag_for_step(10)}/zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert list_checkpoints(storage, JOB) == []
    (info,) = list_checkpoints(storage, JOB, include_incomplete=True)
    assert not info.complete
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in info.reason
    assert "missing or wrong size" in info.reason and "want 65 bytes, found None" in info.reason


def test_marker_listing_a_file_with_the_wrong_size_is_excluded(storage):
    ck = make_checkpoint(storage, 10)
    Path(f"{ck}/hf/config.json").write_bytes(b"{}")  # truncated
    assert list_checkpoints(storage, JOB) == []
    (info,) = list_checkpoints(storage, JOB, include_incomplete=True)
    assert "hf/config.json" in info.reason and "found 2" in info.reason


def test_extra_files_not_in_the_marker_do_not_matter(storage):
    ck = make_checkpoint(storage, 10)
    _write(f"{ck}/rng/rank_9.pt", b"x")
    assert [c.step for c in list_checkpoints(storage, JOB)] == [10]


def test_unreadable_marker_is_incomplete_not_an_exception(storage):
    ck = make_checkpoint(storage, 10)
    Path(f"{ck}/{MARKER}").write_text("{not json")
    (info,) = list_checkpoints(storage, JOB, include_incomplete=True)
    assert not info.complete and info.reason.startswith("unreadable marker")
    assert list_checkpoints(storage, JOB) == []


def test_other_folders_are_ignored(storage):
    make_checkpoint(storage, 10)
    _write(storage.path("jobs", JOB, "checkpoint_tmp_abc", "x"), b"1")
    _write(storage.path("jobs", JOB, "zeroplane_result.json"), b"{}")
    _write(storage.path("jobs", JOB, "driver_artifacts", "y"), b"1")
    assert [c.step for c in list_checkpoints(storage, JOB, include_incomplete=True)] == [10]


def test_inspect_checkpoint_direct(storage):
    ck = make_checkpoint(storage, 42)
    info = inspect_checkpoint(storage, JOB, ck + "/")
    assert info.complete and info.step == 42


def test_latest_complete_picks_the_newest_complete(storage):
    assert latest_complete(storage, JOB) is None
    make_checkpoint(storage, 10)
    make_checkpoint(storage, 20)
    make_checkpoint(storage, 30, marker=False)  # newer but incomplete
    ck40 = make_checkpoint(storage, 40)
    os.remove(f"{ck40}/ds/latest")  # newest but broken
    latest = latest_complete(storage, JOB)
    assert latest is not None and latest.step == 20


def test_unknown_job_has_no_checkpoints(storage):
    assert list_checkpoints(storage, "nope") == []
    assert latest_complete(storage, "nope") is None


# ---------------------------------------------------------------- registry


def _hf_folder(tmp_path: Path, tag: str) -> Path:
    d = tmp_path / f"hf-{tag}"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "tag": tag}))
    (d / "model.safetensors").write_bytes(b"w" * 1000)
    (d / "tokenizer.json").write_text("{}")
    (d / "sub" / "extra.txt").write_text("x")
    return d


def _record(step: int) -> dict:
    return {"source": {"job_id": JOB, "step": step}, "metrics": {"val_loss": 3.0}}


def test_register_two_versions(tmp_path, storage):
    reg = Registry(storage)
    assert reg.models() == [] and reg.versions("tiny") == []
    assert reg.next_version("tiny") == "v1"
    r1 = reg.register("tiny", _hf_folder(tmp_path, "a"), _record(10))
    r2 = reg.register("tiny", _hf_folder(tmp_path, "b"), _record(20))
    assert (r1["version"], r2["version"]) == ("v1", "v2")
    assert r1["name"] == "tiny" and r1["source"] == {"job_id": JOB, "step": 10}
    assert r1["files"] == {"config.json": len(json.dumps({"model_type": "gpt2", "tag": "a"})),
                           "model.safetensors": 1000, "tokenizer.json": 2, "sub/extra.txt": 1}
    assert r2["uri"] == storage.path("models", "tiny", "v2")
    assert [v["version"] for v in reg.versions("tiny")] == ["v1", "v2"]
    assert reg.models() == ["tiny"]
    # the version folder is a plain copy of the source plus the marker
    files = storage.list_files(reg.version_dir("tiny", "v2"))
    assert set(files) == {"config.json", "model.safetensors", "tokenizer.json", "sub/extra.txt", VERSION_MARKER}
    assert json.loads(storage.read_bytes(f"{reg.version_dir('tiny', 'v2')}/config.json"))["tag"] == "b"


def test_unfinished_version_is_ignored_and_never_reused(tmp_path, storage):
    reg = Registry(storage)
    reg.register("tiny", _hf_folder(tmp_path, "a"), _record(10))
    reg.register("tiny", _hf_folder(tmp_path, "b"), _record(20))
    storage.upload_dir(_hf_folder(tmp_path, "c"), reg.version_dir("tiny", "v3"))  # no marker: left by a crash
    _write(storage.path("models", "tiny", "notes"), b"not a version")
    assert [v["version"] for v in reg.versions("tiny")] == ["v1", "v2"]
    assert reg.get("tiny")["version"] == "v2"
    assert reg.next_version("tiny") == "v4"
    r4 = reg.register("tiny", _hf_folder(tmp_path, "d"), _record(40))
    assert r4["version"] == "v4"
    assert [v["version"] for v in reg.versions("tiny")] == ["v1", "v2", "v4"]


def test_versions_sort_numerically(tmp_path, storage):
    reg = Registry(storage)
    src = _hf_folder(tmp_path, "a")
    for _ in range(11):
        reg.register("m", src, _record(1))
    assert [v["version"] for v in reg.versions("m")][-3:] == ["v9", "v10", "v11"]
    assert reg.get("m")["version"] == "v11"


def test_get(tmp_path, storage):
    reg = Registry(storage)
    reg.register("tiny", _hf_folder(tmp_path, "a"), _record(10))
    reg.register("tiny", _hf_folder(tmp_path, "b"), _record(20))
    assert reg.get("tiny")["version"] == "v2"
    assert reg.get("tiny", "v1")["source"]["step"] == 10
    with pytest.raises(NotFoundError) as ei:
        reg.get("tiny", "v9")
    assert "tiny:v9" in ei.value.message and "v1, v2" in ei.value.message
    assert ei.value.exit_code == 1
    with pytest.raises(NotFoundError, match="no registered versions"):
        reg.get("other")


def test_register_rejects_a_bad_name_before_writing(tmp_path, storage):
    with pytest.raises(SpecError):
        Registry(storage).register("Bad_Name", _hf_folder(tmp_path, "a"), {})
    assert not storage.exists(storage.path("models"))


def test_failed_registration_leaves_no_folder(tmp_path, storage):
    reg = Registry(storage)
    # mixed key types make the marker's JSON (sort_keys) fail after the files were uploaded
    with pytest.raises(ZeroplaneError, match="registering tiny:v1"):
        reg.register("tiny", _hf_folder(tmp_path, "a"), {1: "int key", "source": {}})
    assert not storage.exists(reg.version_dir("tiny", "v1"))
    assert reg.versions("tiny") == []
    assert reg.next_version("tiny") == "v1"


@pytest.mark.parametrize("name", ["tiny", "a", "gpt-2", "x" * 48, "0a9"])
def test_check_model_name_accepts(name):
    assert check_model_name(name) == name


@pytest.mark.parametrize("name", ["", "Tiny", "tiny_1", "-a", "a-", "x" * 49, "a.b", "a/b", None])
def test_check_model_name_rejects(name):
    with pytest.raises(SpecError) as ei:
        check_model_name(name)
    assert "--name" in ei.value.message and "lowercase" in ei.value.message


def test_trailing_newline_in_model_name_or_version_is_rejected():
    with pytest.raises(SpecError):
        check_model_name("tiny\n")
    with pytest.raises(SpecError):
        parse_ref("tiny:v1\n")


def test_parse_ref():
    assert parse_ref("tiny") == ("tiny", None)
    assert parse_ref("tiny:v3") == ("tiny", "v3")
    assert parse_ref("tiny:") == ("tiny", None)
    for bad in ("tiny:3", "tiny:latest", "tiny:v", "tiny:v1:v2"):
        with pytest.raises(SpecError, match="version must look like v1"):
            parse_ref(bad)
    with pytest.raises(SpecError, match="--name"):
        parse_ref("Tiny:v1")


# ---------------------------------------------------------------- storage


def test_from_uri_local_and_errors(tmp_path, monkeypatch):
    st = Storage.from_uri(str(tmp_path / "a" / ".." / "b"))
    assert st.uri == st.root == str((tmp_path / "b").resolve()) and st.is_local
    assert Storage.from_uri("file://" + str(tmp_path)).root == str(tmp_path.resolve())
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Storage.from_uri("~/zp").root == str(tmp_path / "zp")
    with pytest.raises(ZeroplaneError, match="unsupported scheme"):
        Storage.from_uri("gs://bucket/x")
    with pytest.raises(ZeroplaneError, match="names no bucket"):
        Storage.from_uri("s3://")


def test_write_json_is_atomic_and_leaves_no_temp_files(storage):
    p = storage.path("a", "b", "doc.json")
    storage.write_json(p, {"x": 1, "nested": {"a": [1, 2]}})
    storage.write_json(p, {"x": 2})  # replace
    assert storage.read_json(p) == {"x": 2}
    assert storage.listdir(storage.path("a", "b")) == ["doc.json"]
    assert storage.list_files(storage.root) == {"a/b/doc.json": len(Path(p).read_bytes())}
    assert Path(p).read_text().endswith("\n")


def test_write_bytes_replaces_via_rename(storage):
    """A reader holding the old file keeps seeing all of it: the new content arrives by rename."""
    p = storage.path("f.bin")
    storage.write_bytes(p, b"old" * 100)
    ino_before = os.stat(p).st_ino
    with open(p, "rb") as reader:
        storage.write_bytes(p, b"new")
        assert reader.read() == b"old" * 100
    assert storage.read_bytes(p) == b"new"
    assert os.stat(p).st_ino != ino_before


def test_list_files_sizes_and_listdir(storage):
    _write(storage.path("d", "one.bin"), b"1")
    _write(storage.path("d", "sub", "two.bin"), b"22")
    _write(storage.path("d", "sub", "deeper", "three.bin"), b"333")
    os.makedirs(storage.path("d", "empty"))
    assert storage.list_files(storage.path("d")) == {"one.bin": 1, "sub/two.bin": 2, "sub/deeper/three.bin": 3}
    assert storage.list_files(storage.path("d") + "/") == storage.list_files(storage.path("d"))
    assert storage.list_files(storage.path("missing")) == {}
    assert storage.listdir(storage.path("d")) == ["empty", "one.bin", "sub"]
    assert storage.listdir(storage.path("missing")) == []
    assert storage.isdir(storage.path("d")) and not storage.isdir(storage.path("d", "one.bin"))
    assert storage.exists(storage.path("d", "one.bin")) and not storage.exists(storage.path("nope"))
    assert storage.relative(storage.path("d", "sub", "two.bin")) == "d/sub/two.bin"


def test_upload_download_round_trip(tmp_path, storage):
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "top.txt").write_text("top")
    (src / "a" / "mid.bin").write_bytes(bytes(range(256)) * 10)
    (src / "a" / "b" / "leaf.json").write_text('{"k": 1}')
    (src / "a" / "skip.me").write_text("no")
    dest = storage.path("models", "m", "v1")
    storage.upload_dir(src, dest, skip=("skip.me",))
    assert storage.list_files(dest) == {"top.txt": 3, "a/mid.bin": 2560, "a/b/leaf.json": 8}

    out = storage.download_dir(dest, tmp_path / "out" / "nested")
    assert out == tmp_path / "out" / "nested"
    got = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    want = {p.relative_to(src).as_posix(): p.read_bytes() for p in src.rglob("*") if p.is_file() and p.name != "skip.me"}
    assert got == want


def test_delete_dir(storage):
    _write(storage.path("x", "y", "z"), b"1")
    storage.delete_dir(storage.path("x"))
    assert not storage.exists(storage.path("x"))
    storage.delete_dir(storage.path("x"))  # missing is fine
