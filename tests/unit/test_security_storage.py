"""Security of the storage side, on real tmp folders: version numbers claimed atomically, key-file updates
that never lose one another, checkpoints loaded without unpickling arbitrary objects, user-given names
that cannot leave the storage root, and endpoints printed without their credentials."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from zeroplane import layout, serve_keys
from zeroplane.checkpoints import MARKER, build_marker, list_checkpoints
from zeroplane.errors import SpecError, ZeroplaneError
from zeroplane.registry import VERSION_MARKER, Registry
from zeroplane.storage import Storage, storage_error

REPO = Path(__file__).resolve().parents[2]
JOB = "tiny-cpu-20250101-000000-abcd"


@pytest.fixture
def storage(tmp_path) -> Storage:
    return Storage.from_uri(str(tmp_path / "store"))


def _hf_folder(tmp_path: Path, tag: str) -> Path:
    d = tmp_path / f"hf-{tag}"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "tag": tag}))
    (d / "model.safetensors").write_bytes(tag.encode() * 500)
    return d


def _child_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO / "platform") + os.pathsep + os.environ.get("PYTHONPATH", "")}


# ---------------------------------------------------------------- 1. version numbers are claimed atomically


def test_create_exclusive_creates_once(storage):
    p = storage.path("models", "m", ".claims", "v1")
    assert storage.create_exclusive(p, b"first") is True
    assert storage.create_exclusive(p, b"second") is False
    assert storage.read_bytes(p) == b"first"


def test_four_concurrent_registrations_get_four_distinct_complete_versions(tmp_path, storage, monkeypatch):
    sources = [_hf_folder(tmp_path, t) for t in "abcd"]
    barrier = threading.Barrier(len(sources), timeout=120)  # a guard against a hang, not a timing check
    original = Storage.upload_dir

    def upload_together(self, local_dir, path, skip=()):
        barrier.wait()  # every registration has picked its number before any uploads
        original(self, local_dir, path, skip)

    monkeypatch.setattr(Storage, "upload_dir", upload_together)
    results, errors = {}, []

    def promote(src: Path) -> None:
        try:
            results[src.name] = Registry(Storage.from_uri(storage.uri)).register("tiny", src, {"src": src.name})
        except BaseException as e:  # reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=promote, args=(s,)) for s in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    versions = sorted(r["version"] for r in results.values())
    assert versions == ["v1", "v2", "v3", "v4"]
    reg = Registry(storage)
    assert [v["version"] for v in reg.versions("tiny")] == ["v1", "v2", "v3", "v4"]
    for src in sources:  # each version holds exactly the folder its promotion uploaded
        rec = results[src.name]
        vdir = reg.version_dir("tiny", rec["version"])
        assert storage.read_json(f"{vdir}/{VERSION_MARKER}")["src"] == src.name
        assert storage.read_bytes(f"{vdir}/model.safetensors") == (src / "model.safetensors").read_bytes()
        assert set(storage.list_files(vdir)) == {"config.json", "model.safetensors", VERSION_MARKER}


def test_failed_registration_removes_only_what_it_created(tmp_path, storage, monkeypatch):
    """B fails while A registers at the same time: B's cleanup must not delete A's finished version."""
    original = Storage.upload_dir
    done = {}

    def a_registers_then_b_fails(self, local_dir, path, skip=()):
        if Path(local_dir).name == "hf-b":
            monkeypatch.setattr(Storage, "upload_dir", original)
            done["a"] = Registry(Storage.from_uri(storage.uri)).register("tiny", _hf_folder(tmp_path, "a"), {"who": "a"})
            raise OSError("disk full")
        original(self, local_dir, path, skip)

    monkeypatch.setattr(Storage, "upload_dir", a_registers_then_b_fails)
    reg = Registry(storage)
    with pytest.raises(ZeroplaneError, match="disk full"):
        reg.register("tiny", _hf_folder(tmp_path, "b"), {"who": "b"})
    (only,) = reg.versions("tiny")
    assert only["who"] == "a" and only["version"] == done["a"]["version"]
    vdir = reg.version_dir("tiny", only["version"])
    assert set(storage.list_files(vdir)) == {"config.json", "model.safetensors", VERSION_MARKER}


def test_next_version_skips_claimed_numbers(tmp_path, storage):
    reg = Registry(storage)
    assert storage.create_exclusive(storage.path(layout.version_claim("tiny", "v1")), b"{}")  # another promotion's
    assert reg.next_version("tiny") == "v2"
    assert reg.register("tiny", _hf_folder(tmp_path, "a"), {})["version"] == "v2"
    assert reg.versions("tiny")[0]["version"] == "v2" and reg.models() == ["tiny"]


# ---------------------------------------------------------------- 2. key-file updates never lose one another

_KEYS_CHILD = r"""
import json, os, sys, time
from zeroplane import serve_keys
from zeroplane.storage import Storage

root, mode, out, ids = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
_read = Storage.read_bytes

def read_slowly(self, path):
    data = _read(self, path)
    time.sleep(0.005)  # widens each read-modify-write so that, without a lock, updates would overlap
    return data

Storage.read_bytes = read_slowly
open(f"{out}.ready", "w").close()
while not os.path.exists(os.path.join(os.path.dirname(out), "go")):
    time.sleep(0.005)
made = []
for i in range(len(ids) if mode == "revoke" else 10):
    if mode == "create":
        made.append(serve_keys.create_key(root, name=f"new-{i}")[0])
    else:
        serve_keys.revoke_key(root, ids[i])
json.dump(made, open(out, "w"))
"""


def test_interleaved_creates_and_revokes_from_two_processes_keep_every_update(tmp_path):
    root = str(tmp_path / "store")
    old = [serve_keys.create_key(root, name=f"old-{i}") for i in range(10)]
    old_ids = [rec["id"] for _, rec in old]
    procs = []
    for mode in ("create", "revoke"):
        out = str(tmp_path / mode)
        procs.append((out, subprocess.Popen([sys.executable, "-c", _KEYS_CHILD, root, mode, out, json.dumps(old_ids)],
                                            env=_child_env())))
    deadline = time.monotonic() + 120  # a guard against a hang, not a timing check
    while not all(os.path.exists(f"{out}.ready") for out, _ in procs):
        assert all(p.poll() is None for _, p in procs) and time.monotonic() < deadline, "children did not start"
        time.sleep(0.01)
    (tmp_path / "go").touch()
    for _, p in procs:
        assert p.wait(timeout=120) == 0
    new_keys = json.loads((tmp_path / "create").read_text())
    records = serve_keys.load_records(root)
    assert len(records) == 20
    assert {r["id"] for r in records if r["revoked"]} == set(old_ids)
    assert all(serve_keys.verify_key(records, k) for k in new_keys)
    assert not any(serve_keys.verify_key(records, k) for k, _ in old)


def test_update_json_reads_back_and_leaves_the_file_alone_when_nothing_changes(storage):
    p = storage.path("serve", "doc.json")
    assert storage.update_json(p, lambda doc: {"n": 1} if doc is None else None) == {"n": 1}
    assert storage.update_json(p, lambda doc: {"n": doc["n"] + 1}) == {"n": 2}
    assert storage.update_json(p, lambda doc: None) == {"n": 2}
    assert storage.read_json(p) == {"n": 2}


# ---------------------------------------------------------------- 3. checkpoints are loaded without unpickling code


class _Planted:
    """Unpickling this creates a file: what a planted checkpoint would do to the operator's machine."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))  # pickled as io.open


def _planted_checkpoint(tmp_path: Path, stage: int, planted: str) -> tuple[Path, Path]:
    """A downloaded checkpoint folder whose ``planted`` DeepSpeed file runs code when unpickled."""
    import torch

    target = tmp_path / "pwned"
    ck = tmp_path / "ckpt"
    tag = layout.tag_for_step(1)
    ds = ck / layout.CKPT_DEEPSPEED_DIR / tag
    ds.mkdir(parents=True)
    (ck / layout.CKPT_DEEPSPEED_DIR / "latest").write_text(tag)
    (ck / layout.CKPT_META).write_text(json.dumps({"zero_stage": stage, "tag": tag, "step": 1}))
    (ck / layout.CKPT_HF_DIR).mkdir()
    model_states = {"module": {"w": torch.zeros(2)}, "buffer_names": [], "param_shapes": [{"w": torch.Size([2])}],
                    "shared_params": {}, "ds_version": "0.19.8"}
    optim_states = {"optimizer_state_dict": {"zero_stage": stage, "partition_count": 1,
                                             "single_partition_of_fp32_groups": [torch.zeros(2)]}}
    files = {"mp_rank_00_model_states.pt": model_states, "zero_pp_rank_0_mp_rank_00_optim_states.pt": optim_states}
    files[planted] = {"module": _Planted(str(target))}
    for name, obj in files.items():
        if stage or "optim" not in name:
            torch.save(obj, ds / name)
    return ck, target


@pytest.mark.parametrize("stage, planted", [(0, "mp_rank_00_model_states.pt"), (2, "mp_rank_00_model_states.pt"),
                                            (2, "zero_pp_rank_0_mp_rank_00_optim_states.pt")])
def test_planted_pickle_in_a_checkpoint_is_refused_and_runs_nothing(tmp_path, stage, planted):
    from zeroplane.promote import consolidate

    ck, target = _planted_checkpoint(tmp_path, stage, planted)
    with pytest.raises(ZeroplaneError) as ei:
        consolidate(ck, tmp_path / "out")
    assert not target.exists()
    msg = ei.value.message
    assert "refus" in msg and "io.open" in msg and "not tensors" in msg and "\n" not in msg, msg
    assert not (tmp_path / "out").exists()


def test_promote_refuses_a_planted_checkpoint_in_storage(tmp_path, storage):
    from zeroplane.promote import promote_checkpoint

    ck, target = _planted_checkpoint(tmp_path, 2, "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    dest = storage.path(layout.checkpoint_dir(JOB, 1))
    storage.upload_dir(ck, dest)
    storage.write_json(f"{dest}/{MARKER}", build_marker(storage.list_files(dest), {"step": 1}))
    assert [c.step for c in list_checkpoints(storage, JOB)] == [1]
    with pytest.raises(ZeroplaneError, match="not tensors"):
        promote_checkpoint(storage, JOB, "tiny")
    assert not target.exists()
    assert Registry(storage).versions("tiny") == []


_DS_CHILD = r"""
import os, sys
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import torch, deepspeed
from zeroplane.spec import load_spec
from zeroplane.spec.deepspeed import build_deepspeed_config

for stage, precision in ((0, "fp32"), (2, "fp32"), (2, "bf16"), (3, "fp32")):
    spec = load_spec(sys.argv[3], [f"deepspeed.zero_stage={stage}", f"train.precision={precision}"])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=build_deepspeed_config(spec, 1))
    loss = engine(torch.randn(4, 8).to(next(engine.module.parameters()).dtype)).float().sum()
    engine.backward(loss)
    engine.step()
    engine.save_checkpoint(os.path.join(sys.argv[1], f"zero{stage}-{precision}"), tag="step_0000001",
                           client_state={"zeroplane_step": 1})
"""


def test_real_deepspeed_checkpoints_load_with_the_allow_list(tmp_path):
    """Real ZeRO 0/2/3 (and bf16) checkpoints saved by the installed DeepSpeed consolidate with weights_only."""
    from zeroplane.promote import load_zero_state

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = subprocess.run([sys.executable, "-c", _DS_CHILD, str(tmp_path), str(port), str(REPO / "jobs" / "tiny-cpu.yaml")],
                         env=_child_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for name, stage in (("zero0-fp32", 0), ("zero2-fp32", 2), ("zero2-bf16", 2), ("zero3-fp32", 3)):
        state = load_zero_state(tmp_path / name, "step_0000001", stage)
        assert {k: tuple(v.shape) for k, v in state.items()} == {
            "0.weight": (8, 8), "0.bias": (8,), "1.weight": (4, 8), "1.bias": (4,)}, name


# ---------------------------------------------------------------- 4. user-given names stay inside the storage root

BAD_JOB_IDS = ["..", ".", "...", "", "../etc", "../../../etc", "/etc", "a/b", "a..b", "job\n", "job id", "a\\b"]


@pytest.mark.parametrize("job_id", ["tiny-cpu-20250101-000000-abcd", "tiny-cpu-20250101-000000-abcd-r2",
                                    "raysubmit_AbC123", "v1.2_x", "nope", "a"])
def test_job_id_rule_accepts(job_id):
    assert layout.check_job_id(job_id) == job_id
    assert layout.job_dir(job_id) == f"jobs/{job_id}"


@pytest.mark.parametrize("job_id", BAD_JOB_IDS)
def test_job_id_rule_rejects_with_the_value_and_the_rule(job_id):
    with pytest.raises(SpecError) as ei:
        layout.job_dir(job_id)
    assert repr(job_id) in ei.value.message and "'..'" in ei.value.message and ei.value.exit_code == 2


@pytest.mark.parametrize("ref", ["..", "..@5", ".@1", "/tmp/st/jobs/../checkpoint_step_0000001",
                                 "st/jobs/../checkpoint_step_0000001", "s3://bucket/../jobs/j/checkpoint_step_0000001",
                                 "a b@3"])
def test_parse_checkpoint_ref_rejects_escaping_names(ref):
    with pytest.raises(SpecError):
        layout.parse_checkpoint_ref(ref)


@pytest.mark.parametrize("job_id", ["..", "../../../etc", "/etc"])
def test_list_and_resolve_checkpoints_refuse_escaping_job_ids(storage, job_id):
    from zeroplane.promote import resolve_checkpoint

    with pytest.raises(SpecError):
        list_checkpoints(storage, job_id)
    with pytest.raises(SpecError):
        resolve_checkpoint(storage, layout.CheckpointRef(job_id, 1))
    with pytest.raises(SpecError):
        resolve_checkpoint(storage, layout.CheckpointRef(job_id))


@pytest.mark.parametrize("name", ["..", "../etc", "/etc", "a/../../b", "Tiny"])
def test_registry_methods_refuse_escaping_model_names(storage, tmp_path, name):
    reg = Registry(storage)
    for call in (lambda: reg.model_dir(name), lambda: reg.version_dir(name, "v1"), lambda: reg.versions(name),
                 lambda: reg.get(name), lambda: reg.next_version(name),
                 lambda: reg.register(name, _hf_folder(tmp_path, "a"), {})):
        with pytest.raises(SpecError):
            call()
    with pytest.raises(SpecError):
        reg.version_dir("tiny", "../v1")


def test_models_listing_skips_folders_that_are_not_model_names(storage, tmp_path):
    reg = Registry(storage)
    reg.register("tiny", _hf_folder(tmp_path, "a"), {})
    os.makedirs(storage.path("models", "Not_A_Name", "v1"))
    assert reg.models() == ["tiny"]


@pytest.mark.parametrize("parts", [("..",), ("..", "x"), ("/etc",), ("a", "..", ".."), ("jobs/../../x",)])
def test_storage_path_refuses_a_result_outside_the_root(storage, parts):
    with pytest.raises(ZeroplaneError, match="outside the storage root"):
        storage.path(*parts)


def test_storage_path_inside_the_root_and_s3_root(storage):
    assert storage.path("a", "..", "b") == storage.root + "/a/../b"
    assert storage.path() == storage.root
    s3 = Storage(uri="s3://bucket/prefix", fs=None, root="bucket/prefix")
    assert s3.path("models") == "bucket/prefix/models"
    for parts in (("..",), ("..", "..", "other-bucket")):
        with pytest.raises(ZeroplaneError, match="outside the storage root"):
            s3.path(*parts)
    with pytest.raises(ZeroplaneError, match=r"'\.\.'"):
        Storage.from_uri("s3://bucket/../other")


def test_cli_checkpoints_list_of_an_escaping_job_id_exits_2(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from zeroplane.cli.main import main

    monkeypatch.setenv("ZEROPLANE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ZEROPLANE_DEBUG", raising=False)
    (tmp_path / "st").mkdir()
    result = CliRunner().invoke(main, ["checkpoints", "list", "../../../etc", "--storage", str(tmp_path / "st")])
    assert result.exit_code == 2, result.output
    assert "'../../../etc'" in result.output


# ---------------------------------------------------------------- 5. endpoints are printed without credentials


@pytest.mark.parametrize("url, want", [
    ("http://user:s3cr3t-pass@minio.local:9000", "http://***@minio.local:9000"),
    ("https://token@host/x", "https://***@host/x"),
    ("http://127.0.0.1:9000", "http://127.0.0.1:9000"),
    (None, None),
])
def test_mask_url(url, want):
    from zeroplane.storage import mask_url

    assert mask_url(url) == want


def test_storage_error_and_repr_mask_the_endpoint_userinfo():
    st = Storage(uri="s3://bucket/p", fs=None, root="bucket/p", endpoint_url="http://admin:s3cr3t-pass@minio.local:9000")
    err = OSError("could not reach http://admin:s3cr3t-pass@minio.local:9000/bucket (admin:s3cr3t-pass)")
    msg = storage_error(st, "is not writable", err)
    assert "s3cr3t-pass" not in msg and "admin" not in msg
    assert "http://***@minio.local:9000" in msg and "is not writable" in msg
    assert "s3cr3t-pass" not in repr(st) and "minio.local:9000" in repr(st)
