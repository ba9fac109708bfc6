"""2-worker Ray Train + DeepSpeed ZeRO training on a real local Ray: loss falls, every rank's shard
lands in the one checkpoint, and a ZeRO-3 checkpoint consolidates to the live model's logits."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from zeroplane.checkpoints import list_checkpoints
from zeroplane.digests import sha256_file
from zeroplane.spec import load_spec
from zeroplane.storage import Storage

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _train(tmp_path: Path, stage: int, *extra: str):
    from zeroplane.runtime.train.driver import build_train_loop_config, build_trainer

    spec = load_spec(REPO / "jobs" / "tiny-cpu.yaml",
                     [f"deepspeed.zero_stage={stage}", f"checkpoint.storage_path={tmp_path}", "train.max_steps=20",
                      "checkpoint.every_n_steps=10", "train.eval_every_n_steps=10", *extra])
    storage = Storage.from_uri(spec.checkpoint.storage_path)
    job_id = f"itest-zero{stage}-{int(time.time())}"
    result = build_trainer(spec, job_id, storage, build_train_loop_config(spec, job_id, storage)).fit()
    return spec, storage, job_id, result


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def trained(request, ray_local, tmp_path_factory):
    return _train(tmp_path_factory.mktemp(f"zero{request.param}"), request.param)


def test_loss_goes_down(trained):
    _spec, _storage, _job, result = trained
    m = result.metrics
    assert m["step"] == 20
    assert m["val_loss"] < m["val_loss_step0"] - 0.3, m


def test_every_rank_shard_in_one_checkpoint(trained):
    spec, storage, job_id, _ = trained
    cks = list_checkpoints(storage, job_id)
    assert [c.step for c in cks] == [10, 20]
    files = storage.list_files(cks[-1].path)
    tag = "step_0000020"
    for rank in range(spec.scaling.num_workers):
        assert f"ds/{tag}/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in files
        assert f"rng/rank_{rank}.pt" in files
        if spec.deepspeed.zero_stage == 3:
            assert f"ds/{tag}/zero_pp_rank_{rank}_mp_rank_00_model_states.pt" in files
    for name in ("hf/config.json", "hf/tokenizer.json", "meta.json", "probe.safetensors", "zeroplane_complete.json"):
        assert name in files
    marker = json.loads(Path(cks[-1].path, "zeroplane_complete.json").read_text())
    assert {k: v for k, v in files.items() if k != "zeroplane_complete.json"} == marker["files"]
    # every file but the digests themselves carries the SHA-256 its rank hashed before the upload
    assert set(marker["sha256"]) == {k for k in marker["files"] if not k.startswith("digests/")}
    assert {f"digests/rank_{r}.json" for r in range(spec.scaling.num_workers)} <= set(files)
    for rel, digest in marker["sha256"].items():
        assert sha256_file(Path(cks[-1].path, rel)) == digest, rel


def test_consolidated_model_matches_live_logits(trained, tmp_path):
    """The probe logits were computed by the live DeepSpeed engine (eval mode) at checkpoint time; the
    consolidated Hugging Face folder must reproduce them, with the LM head still tied."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from zeroplane.promote import consolidate

    _spec, storage, job_id, _ = trained
    ck = list_checkpoints(storage, job_id)[-1]
    local = Path(ck.path)
    details = consolidate(local, tmp_path / "hf")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert details["parameters"] == sum(p.numel() for p in set(model.parameters()))
    model.eval()
    ids = torch.tensor(json.loads((local / "probe.json").read_text())["input_ids"])
    want = load_file(local / "probe.safetensors")["logits"]
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
