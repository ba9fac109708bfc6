"""The generated DeepSpeed config for every ZeRO stage × offload combination the spec accepts."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zeroplane.errors import SpecError
from zeroplane.spec import load_spec, parse_spec
from zeroplane.spec.deepspeed import build_deepspeed_config, deep_merge

REPO = Path(__file__).resolve().parents[2]

ALL_COMBOS = list(itertools.product([0, 1, 2, 3], ["none", "cpu"], ["none", "cpu"]))


def _accepted(stage: int, off_opt: str, off_param: str) -> bool:
    """The rule from the design: param offload needs stage 3, optimizer offload needs stage >= 1."""
    return not (off_param == "cpu" and stage != 3) and not (off_opt == "cpu" and stage == 0)


VALID = [c for c in ALL_COMBOS if _accepted(*c)]
INVALID = [c for c in ALL_COMBOS if not _accepted(*c)]


def _spec(stage=2, off_opt="none", off_param="none", use_gpu=False, **sections):
    data = {"name": "ds", "deepspeed": {"zero_stage": stage, "offload_optimizer": off_opt, "offload_param": off_param}}
    if use_gpu:
        data["scaling"] = {"use_gpu": True, "resources_per_worker": {"CPU": 1, "GPU": 1}}
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return parse_spec(data)


def test_combination_counts():
    assert len(VALID) == 9 and len(INVALID) == 7


@pytest.mark.parametrize("use_gpu", [False, True], ids=["cpu", "gpu"])
@pytest.mark.parametrize("stage,off_opt,off_param", VALID, ids=[f"z{s}-opt_{o}-param_{p}" for s, o, p in VALID])
def test_valid_combination(stage, off_opt, off_param, use_gpu):
    cfg = build_deepspeed_config(_spec(stage, off_opt, off_param, use_gpu))
    zero = cfg["zero_optimization"]
    assert zero["stage"] == stage

    assert ("offload_optimizer" in zero) == (off_opt == "cpu")
    if off_opt == "cpu":
        assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": use_gpu}
    assert ("offload_param" in zero) == (off_param == "cpu")
    if off_param == "cpu":
        assert zero["offload_param"] == {"device": "cpu", "pin_memory": use_gpu}

    # FusedAdam needs CUDA: torch's AdamW on CPU workers unless DeepSpeed's CPU Adam runs (offload)
    params = cfg["optimizer"]["params"]
    assert cfg["optimizer"]["type"] == "AdamW"
    assert params.get("torch_adam", False) is (not use_gpu and off_opt == "none")

    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is False
    else:
        assert not any(k.startswith("stage3") for k in zero)
    if stage in (1, 2):
        assert zero["contiguous_gradients"] is True
        assert zero["overlap_comm"] is use_gpu

    assert json.loads(json.dumps(cfg)) == cfg


@pytest.mark.parametrize("stage,off_opt,off_param", INVALID, ids=[f"z{s}-opt_{o}-param_{p}" for s, o, p in INVALID])
def test_invalid_combination_is_rejected_by_the_spec(stage, off_opt, off_param):
    with pytest.raises(SpecError) as ei:
        _spec(stage, off_opt, off_param)
    msg = ei.value.message
    assert "deepspeed" in msg and f"(got {stage})" in msg
    bad = "offload_param" if off_param == "cpu" and stage != 3 else "offload_optimizer"
    assert f"{bad}='cpu'" in msg


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_train_batch_size_identity(world_size):
    spec = _spec(train={"micro_batch_size_per_worker": 4, "gradient_accumulation_steps": 3},
                 scaling={"num_workers": world_size})
    for cfg, ws in ((build_deepspeed_config(spec), world_size), (build_deepspeed_config(spec, world_size=5), 5)):
        assert cfg["train_micro_batch_size_per_gpu"] == 4
        assert cfg["gradient_accumulation_steps"] == 3
        assert cfg["train_batch_size"] == 4 * 3 * ws


def test_optimizer_scheduler_and_clipping_come_from_the_spec():
    spec = _spec(train={"max_steps": 123, "warmup_steps": 17, "lr": 2.5e-4, "weight_decay": 0.1,
                        "betas": [0.8, 0.99], "grad_clip": 0.5})
    cfg = build_deepspeed_config(spec)
    sched = cfg["scheduler"]
    assert sched["type"] == "WarmupDecayLR"
    assert sched["params"]["total_num_steps"] == 123
    assert sched["params"]["warmup_num_steps"] == 17
    assert sched["params"]["warmup_max_lr"] == pytest.approx(2.5e-4)
    assert sched["params"]["warmup_min_lr"] == 0.0
    assert sched["params"]["warmup_type"] == "linear"
    opt = cfg["optimizer"]["params"]
    assert opt["lr"] == pytest.approx(2.5e-4)
    assert opt["betas"] == [0.8, 0.99]
    assert opt["weight_decay"] == pytest.approx(0.1)
    assert cfg["gradient_clipping"] == pytest.approx(0.5)


def test_fp32_has_no_mixed_precision_section():
    cfg = build_deepspeed_config(_spec())
    assert "bf16" not in cfg and "fp16" not in cfg


def test_bf16_section():
    cfg = build_deepspeed_config(_spec(train={"precision": "bf16"}))
    assert cfg["bf16"] == {"enabled": True}
    assert "fp16" not in cfg


def test_fp16_section_on_gpu():
    cfg = build_deepspeed_config(_spec(use_gpu=True, train={"precision": "fp16"}))
    assert cfg["fp16"]["enabled"] is True
    assert cfg["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    assert "bf16" not in cfg


def test_overrides_merge_recursively_and_last():
    overrides = {
        "zero_optimization": {"offload_optimizer": {"pin_memory": True}, "reduce_bucket_size": 5e7},
        "scheduler": {"params": {"warmup_num_steps": 7}},
        "gradient_clipping": 0.25,
        "bf16": {"enabled": False},
        "new_section": {"a": 1},
    }
    spec = _spec(2, "cpu", "none", train={"precision": "bf16"}, deepspeed={"overrides": overrides})
    cfg = build_deepspeed_config(spec)
    zero = cfg["zero_optimization"]
    # nested key replaced, siblings kept
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["stage"] == 2 and zero["contiguous_gradients"] is True
    assert zero["reduce_bucket_size"] == 5e7
    assert cfg["scheduler"]["params"]["warmup_num_steps"] == 7
    assert cfg["scheduler"]["params"]["total_num_steps"] == spec.train.max_steps
    assert cfg["scheduler"]["type"] == "WarmupDecayLR"
    # plain values replaced; generated sections overridden; new sections added
    assert cfg["gradient_clipping"] == 0.25
    assert cfg["bf16"] == {"enabled": False}
    assert cfg["new_section"] == {"a": 1}
    assert json.loads(json.dumps(cfg)) == cfg
    # the spec's overrides are not mutated, and a second call gives the same config
    assert spec.deepspeed.overrides == overrides
    assert build_deepspeed_config(spec) == cfg


def test_override_replaces_a_mapping_with_a_scalar_and_vice_versa():
    spec = _spec(deepspeed={"overrides": {"scheduler": None, "gradient_clipping": {"x": 1}}})
    cfg = build_deepspeed_config(spec)
    assert cfg["scheduler"] is None
    assert cfg["gradient_clipping"] == {"x": 1}


def test_override_given_with_set_keeps_numbers_numeric():
    spec = load_spec(REPO / "jobs" / "tiny-cpu.yaml", ["deepspeed.overrides.optimizer.params.lr=1e-3"])
    cfg = build_deepspeed_config(spec)
    assert isinstance(cfg["optimizer"]["params"]["lr"], float) and cfg["optimizer"]["params"]["lr"] == 1e-3


def test_deep_merge_does_not_mutate_its_inputs():
    base = {"a": {"b": 1, "c": [1]}, "d": 1}
    extra = {"a": {"b": 2, "e": {"f": 3}}}
    out = deep_merge(base, extra)
    assert out == {"a": {"b": 2, "c": [1], "e": {"f": 3}}, "d": 1}
    assert base == {"a": {"b": 1, "c": [1]}, "d": 1}
    out["a"]["e"]["f"] = 9
    assert extra["a"]["e"]["f"] == 3


def test_building_the_config_does_not_import_deepspeed():
    code = (
        "import sys\n"
        "from zeroplane.spec import load_spec\n"
        "from zeroplane.spec.deepspeed import build_deepspeed_config\n"
        "spec = load_spec('jobs/tiny-cpu.yaml', ['deepspeed.zero_stage=3', 'deepspeed.offload_param=cpu',"
        " 'deepspeed.offload_optimizer=cpu'])\n"
        "cfg = build_deepspeed_config(spec)\n"
        "assert cfg['zero_optimization']['stage'] == 3\n"
        "print(sorted(m for m in ('deepspeed', 'torch', 'ray') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("preset,width", [("tiny", 64), ("small", 256), ("gpt2-124m", 768)])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_buckets_follow_the_model_width(stage, preset, width):
    """Hugging Face's ``auto`` values: reduce bucket hidden², stage-3 prefetch 0.9·hidden², persistence 10·hidden."""
    zero = build_deepspeed_config(_spec(stage, model={"preset": preset}))["zero_optimization"]
    want = {}
    if stage >= 1:
        want["reduce_bucket_size"] = width * width
    if stage == 3:
        want.update(stage3_prefetch_bucket_size=int(0.9 * width * width), stage3_param_persistence_threshold=10 * width)
    got = {k: v for k, v in zero.items() if k in ("reduce_bucket_size", "stage3_prefetch_bucket_size",
                                                  "stage3_param_persistence_threshold")}
    assert got == want


def test_zero_buckets_width_sources_and_overrides():
    from zeroplane.spec.deepspeed import model_hidden_size, zero_buckets

    assert model_hidden_size(_spec(model={"preset": "small", "config": {"n_embd": 384, "n_head": 6}})) == 384
    assert model_hidden_size(_spec(model={"architecture": "llama", "preset": "small"})) == 256
    assert model_hidden_size(_spec(model={"architecture": "llama", "preset": None, "config": {"hidden_size": 96}})) == 96
    # a pretrained folder without sizes in the spec: the workers pass its config's width; the spec alone says nothing
    pretrained = _spec(3, model={"pretrained": "/models/x"})
    assert model_hidden_size(pretrained) is None
    assert "reduce_bucket_size" not in build_deepspeed_config(pretrained)["zero_optimization"]
    assert build_deepspeed_config(pretrained, hidden_size=128)["zero_optimization"]["reduce_bucket_size"] == 128 ** 2
    # an explicit override still wins
    cfg = build_deepspeed_config(_spec(2, deepspeed={"overrides": {"zero_optimization": {"reduce_bucket_size": 5e8}}}))
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 5e8
    with pytest.raises(ValueError, match="hidden_size"):
        zero_buckets(2, 0)


_GATHERED_CHILD = r"""
import json, os, sys
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import torch, deepspeed
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from zeroplane.runtime.train.loop import release_gathered_params
from zeroplane.spec import load_spec
from zeroplane.spec.deepspeed import build_deepspeed_config

spec = load_spec(sys.argv[2], ["deepspeed.zero_stage=3"])
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                  config=build_deepspeed_config(spec, 1, hidden_size=16))

def gathered():  # parameters held whole beyond the persistent (small) ones
    return sum(1 for p in engine.module.parameters() if p.ds_status == ZeroParamStatus.AVAILABLE and not p.ds_persist)

x = torch.randn(4, 64)
engine.backward(engine(x).sum())
engine.step()
after_step = gathered()
engine.eval()
with torch.no_grad():
    engine(x)
after_eval = gathered()
release_gathered_params(engine, 3)
engine.train()
after_release = gathered()
engine.backward(engine(x).sum())  # training goes on: parameters are gathered again on use
engine.step()
partitioned = sum(1 for p in engine.module.parameters() if not p.ds_persist)
print(json.dumps({"partitioned": partitioned, "after_step": after_step, "after_eval": after_eval,
                  "after_release": after_release}))
"""


def test_zero3_evaluation_leaves_no_gathered_parameters(tmp_path):
    """A ZeRO-3 forward without backward (evaluation, the probe) keeps the weights gathered whole;
    ``release_gathered_params`` returns the rank to its partitions, and training continues."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform")}
    run = subprocess.run([sys.executable, "-c", _GATHERED_CHILD, str(port), str(REPO / "jobs" / "tiny-cpu.yaml")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    counts = json.loads(run.stdout.strip().splitlines()[-1])
    assert counts["after_step"] == 0, counts
    assert counts["partitioned"] >= 2 and counts["after_eval"] == counts["partitioned"], counts  # all whole
    assert counts["after_release"] == 0, counts
