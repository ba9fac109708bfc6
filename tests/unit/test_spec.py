"""Job-spec schema: the shipped specs validate, defaults fill in, bad specs fail with the field, the
value and the fix; ``--set`` overrides; file errors; every schema property is described."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from zeroplane.errors import SpecError
from zeroplane.spec import JobSpec, PRESETS, apply_overrides, json_schema, load_spec, parse_spec

REPO = Path(__file__).resolve().parents[2]
JOBS = sorted((REPO / "jobs").glob("*.yaml"))


def _spec_error(data, source: str = "spec") -> str:
    """Validate ``data`` expecting a SpecError; return its message."""
    with pytest.raises(SpecError) as ei:
        parse_spec(data, source=source)
    err = ei.value
    assert err.exit_code == 2
    return err.message


# ---------------------------------------------------------------- good specs


def test_shipped_job_specs_exist():
    names = {p.name for p in JOBS}
    assert {"tiny-cpu.yaml", "pydoc-gpt.yaml"} <= names


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_shipped_job_specs_validate(path):
    spec = load_spec(path)
    assert isinstance(spec, JobSpec)
    assert spec.name == path.stem
    assert spec.model.preset in PRESETS or spec.model.config or spec.model.pretrained
    # the resolved spec survives a JSON round trip unchanged (it travels to the cluster that way)
    again = parse_spec(spec.model_dump(mode="json"))
    assert again == spec


def test_tiny_cpu_values_and_defaults_fill_in():
    spec = load_spec(REPO / "jobs" / "tiny-cpu.yaml")
    # values from the file
    assert spec.model.preset == "tiny"
    assert spec.deepspeed.zero_stage == 2
    assert spec.tokenizer.train_bpe.vocab_size == 512
    assert spec.data.seq_len == 64 and spec.data.max_chars == 200000
    assert spec.train.max_steps == 30 and spec.train.lr == pytest.approx(3e-3)
    assert spec.serve.ray_actor_options == {"num_cpus": 0.25}
    # fields the file leaves out take their defaults
    assert spec.train.gradient_accumulation_steps == 1
    assert spec.train.precision == "fp32"
    assert spec.train.betas == (0.9, 0.95)
    assert spec.tokenizer.train_bpe.min_frequency == 2
    assert spec.deepspeed.offload_optimizer == "none"
    assert spec.deepspeed.offload_param == "none"
    assert spec.deepspeed.overrides == {}
    assert spec.scaling.use_gpu is False
    assert spec.scaling.placement_strategy == "PACK"
    assert spec.checkpoint.score_order == "min"
    assert spec.serve.auth is True
    assert spec.model.config == {}


def test_minimal_spec_gets_design_defaults():
    spec = parse_spec({"name": "x"})
    assert spec.model.architecture == "gpt2" and spec.model.preset == "small"
    assert spec.tokenizer.train_bpe.vocab_size == 8192
    assert spec.data.source == "builtin:pydoc" and spec.data.seq_len == 256
    assert spec.data.validation_fraction == pytest.approx(0.05)
    assert spec.train.max_steps == 300 and spec.train.warmup_steps == 20
    assert spec.deepspeed.zero_stage == 2
    assert spec.scaling.num_workers == 2 and spec.scaling.resources_per_worker == {"CPU": 1}
    assert spec.checkpoint.storage_path == "~/.zeroplane/storage"
    assert spec.failure.max_failures == 2
    assert spec.serve.autoscaling.min_replicas == 1 and spec.serve.autoscaling.max_replicas == 4


def test_defaults_are_not_shared_between_specs():
    a, b = parse_spec({"name": "a"}), parse_spec({"name": "b"})
    a.scaling.resources_per_worker["CPU"] = 7
    assert b.scaling.resources_per_worker == {"CPU": 1}


@pytest.mark.parametrize("name", ["a", "tiny-cpu", "x1", "a" * 48, "0-0"])
def test_valid_names(name):
    assert parse_spec({"name": name}).name == name


def test_bf16_on_cpu_and_fp16_on_gpu_are_allowed():
    assert parse_spec({"name": "a", "train": {"precision": "bf16"}}).train.precision == "bf16"
    s = parse_spec({"name": "a", "train": {"precision": "fp16"},
                    "scaling": {"use_gpu": True, "resources_per_worker": {"CPU": 1, "GPU": 1}}})
    assert s.train.precision == "fp16"


def test_stage3_with_both_offloads_is_valid():
    s = parse_spec({"name": "a", "deepspeed": {"zero_stage": 3, "offload_optimizer": "cpu", "offload_param": "cpu"}})
    assert (s.deepspeed.zero_stage, s.deepspeed.offload_optimizer, s.deepspeed.offload_param) == (3, "cpu", "cpu")


def test_min_replicas_equal_max_and_zero_resources_are_valid():
    s = parse_spec({"name": "a", "serve": {"autoscaling": {"min_replicas": 2, "max_replicas": 2}},
                    "scaling": {"use_gpu": True, "resources_per_worker": {"CPU": 0, "GPU": 1}}})
    assert s.serve.autoscaling.min_replicas == 2
    assert s.scaling.resources_per_worker == {"CPU": 0, "GPU": 1}  # a CPU job needs CPU > 0 (test_doomed_specs)


# ---------------------------------------------------------------- bad specs

# (id, spec, fragments the message must contain: field path, bad value, fix hint)
BAD = [
    ("unknown-field", {"name": "a", "train": {"lrr": 1}},
     ["spec: train.lrr", "= 1", "unknown field", "did you mean 'lr'?", "remove it or fix the spelling"]),
    ("unknown-top-level-field", {"name": "a", "trian": {"lr": 1}},
     ["spec: trian", "unknown field", "did you mean 'train'?", "remove it or fix the spelling"]),
    ("wrong-type-float", {"name": "a", "train": {"lr": "fast"}},
     ["spec: train.lr", '"fast"', "should be a valid number"]),
    ("wrong-type-int", {"name": "a", "train": {"max_steps": "ten"}},
     ["spec: train.max_steps", '"ten"', "should be a valid integer"]),
    ("wrong-literal", {"name": "a", "deepspeed": {"zero_stage": 4}},
     ["spec: deepspeed.zero_stage", "= 4", "0, 1, 2 or 3"]),
    ("bad-name", {"name": "Bad_Name"},
     ["spec: name", "Bad_Name", "lowercase letters, digits and '-'"]),
    ("name-too-long", {"name": "a" * 49},
     ["spec: name", "a" * 49, "1-48 chars"]),
    ("name-trailing-dash", {"name": "job-"},
     ["spec: name", "job-", "ending with a letter or digit"]),
    ("offload-param-without-stage-3", {"name": "a", "deepspeed": {"zero_stage": 2, "offload_param": "cpu"}},
     ["spec: deepspeed", "offload_param='cpu'", "(got 2)", "set deepspeed.zero_stage: 3 or offload_param: none"]),
    ("offload-optimizer-stage-0", {"name": "a", "deepspeed": {"zero_stage": 0, "offload_optimizer": "cpu"}},
     ["spec: deepspeed", "offload_optimizer='cpu'", "(got 0)", "raise deepspeed.zero_stage or set offload_optimizer: none"]),
    ("warmup-equals-max-steps", {"name": "a", "train": {"max_steps": 10, "warmup_steps": 10}},
     ["spec: train", "warmup_steps=10", "max_steps=10", "lower warmup_steps"]),
    ("warmup-above-max-steps", {"name": "a", "train": {"max_steps": 10, "warmup_steps": 50}},
     ["spec: train", "warmup_steps=50", "max_steps=10", "lower warmup_steps"]),
    ("fp16-without-gpu", {"name": "a", "train": {"precision": "fp16"}},
     ["train.precision", "'fp16'", "use precision fp32 or bf16, or set scaling.use_gpu: true"]),
    ("min-replicas-above-max", {"name": "a", "serve": {"autoscaling": {"min_replicas": 5, "max_replicas": 2}}},
     ["spec: serve.autoscaling", "min_replicas=5", "max_replicas=2", "raise max_replicas"]),
    ("negative-resources", {"name": "a", "scaling": {"resources_per_worker": {"CPU": -1}}},
     ["spec: scaling.resources_per_worker", "CPU=-1", "is negative", "use a count >= 0"]),
    ("unknown-builtin-corpus", {"name": "a", "data": {"source": "builtin:wiki"}},
     ["spec: data.source", "builtin:wiki", "the only builtin is 'builtin:pydoc'"]),
    ("hf-source", {"name": "a", "data": {"source": "hf:wikitext"}},
     ["spec: data.source", "hf:wikitext", "point `source` at local .txt/.jsonl files"]),
    ("missing-name", {"train": {"max_steps": 50}},
     ["spec: name", "required field is missing", "add it"]),
    ("gpu-without-gpu-resource", {"name": "a", "scaling": {"use_gpu": True, "resources_per_worker": {"GPU": 0}}},
     ["scaling.use_gpu", "resources_per_worker.GPU", "give each worker one GPU"]),
]


@pytest.mark.parametrize("data,fragments", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_spec_names_field_value_and_fix(data, fragments):
    msg = _spec_error(copy.deepcopy(data))
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in message:\n{msg}"
    # one problem, one line after the header
    assert msg.splitlines()[0] == "invalid spec"
    assert len(msg.splitlines()) == 2, msg


def test_name_with_trailing_newline_is_rejected():
    _spec_error({"name": "tiny\n"})


def test_every_problem_is_reported_at_once():
    msg = _spec_error({"name": "Bad", "train": {"lr": -1.0}, "data": {"seq_len": 2}})
    lines = msg.splitlines()[1:]
    assert len(lines) == 3, msg
    assert any(line.startswith("spec: name") for line in lines)
    assert any(line.startswith("spec: train.lr = -1.0") for line in lines)
    assert any(line.startswith("spec: data.seq_len = 2") and "greater than or equal to 8" in line for line in lines)


def test_source_prefixes_each_line():
    msg = _spec_error({"name": "a", "train": {"lr": "x"}}, source="jobs/mine.yaml")
    assert msg.splitlines()[1].startswith("jobs/mine.yaml: train.lr")


@pytest.mark.parametrize("data", [[1, 2], "name: x", 3])
def test_non_mapping_spec_is_rejected(data):
    msg = _spec_error(data)
    assert "must be a YAML mapping" in msg and type(data).__name__ in msg


def test_validate_assignment_rejects_bad_values_later():
    spec = parse_spec({"name": "a"})
    with pytest.raises(Exception):
        spec.train.lr = "fast"


# ---------------------------------------------------------------- --set overrides


def test_set_parses_ints_floats_bools_and_strings():
    data = apply_overrides({}, ["train.max_steps=10", "train.lr=1.0e-3", "scaling.use_gpu=true",
                                "data.source=corpus/*.txt", "checkpoint.num_to_keep=null"])
    assert data["train"] == {"max_steps": 10, "lr": 1.0e-3}
    assert type(data["train"]["max_steps"]) is int
    assert data["scaling"]["use_gpu"] is True
    assert data["data"]["source"] == "corpus/*.txt"
    assert data["checkpoint"]["num_to_keep"] is None


def test_set_parses_exponent_floats_and_leading_zeros_as_written():
    data = apply_overrides({}, ["deepspeed.overrides.optimizer.params.lr=1e-3", "train.seed=0123"])
    assert data["deepspeed"]["overrides"]["optimizer"]["params"]["lr"] == 1e-3
    assert data["train"]["seed"] == 123


def test_set_nested_mapping_value():
    data = apply_overrides({"scaling": {"resources_per_worker": {"CPU": 1}, "num_workers": 2}},
                           ["scaling.resources_per_worker={CPU: 2, GPU: 1}"])
    assert data == {"scaling": {"resources_per_worker": {"CPU": 2, "GPU": 1}, "num_workers": 2}}


def test_set_creates_missing_mappings_and_keeps_siblings():
    data = {"train": {"lr": 0.1}, "tokenizer": {"train_bpe": None}}
    out = apply_overrides(data, ["train.max_steps=7", "deepspeed.overrides.zero_optimization.stage=3",
                                 "tokenizer.train_bpe.vocab_size=300"])
    assert out is data  # in place, also returned
    assert data["train"] == {"lr": 0.1, "max_steps": 7}
    assert data["deepspeed"] == {"overrides": {"zero_optimization": {"stage": 3}}}
    assert data["tokenizer"] == {"train_bpe": {"vocab_size": 300}}


def test_set_value_may_contain_equals_sign():
    assert apply_overrides({}, ["data.source=a=b.txt"]) == {"data": {"source": "a=b.txt"}}


def test_set_later_override_wins():
    assert apply_overrides({}, ["train.max_steps=1", "train.max_steps=2"]) == {"train": {"max_steps": 2}}


def test_set_into_a_scalar_is_an_error():
    with pytest.raises(SpecError) as ei:
        apply_overrides({"a": 1}, ["a.b=1"])
    msg = ei.value.message
    assert "'a.b=1'" in msg and "'a' is 1, not a mapping" in msg and "override 'a' itself" in msg


def test_set_into_a_deeper_scalar_names_the_path():
    with pytest.raises(SpecError) as ei:
        apply_overrides({"train": {"lr": 0.1}}, ["train.lr.x=1"])
    assert "'train.lr' is 0.1, not a mapping" in ei.value.message


def test_set_without_equals_is_an_error():
    with pytest.raises(SpecError) as ei:
        apply_overrides({}, ["train.max_steps"])
    msg = ei.value.message
    assert "'train.max_steps'" in msg and "key.path=value" in msg
    assert ei.value.exit_code == 2


def test_set_with_empty_key_is_an_error():
    with pytest.raises(SpecError, match="empty key"):
        apply_overrides({}, ["=3"])


def test_load_spec_applies_overrides_before_validation():
    spec = load_spec(REPO / "jobs" / "tiny-cpu.yaml",
                     ["deepspeed.zero_stage=3", "deepspeed.offload_param=cpu", "train.max_steps=5",
                      "scaling.resources_per_worker={CPU: 2}"])
    assert spec.deepspeed.zero_stage == 3 and spec.deepspeed.offload_param == "cpu"
    assert spec.train.max_steps == 5
    assert spec.scaling.resources_per_worker == {"CPU": 2}


def test_load_spec_override_error_names_file_and_field():
    path = REPO / "jobs" / "tiny-cpu.yaml"
    with pytest.raises(SpecError) as ei:
        load_spec(path, ["deepspeed.offload_param=cpu"])
    msg = ei.value.message
    assert f"{path}: deepspeed" in msg and "offload_param='cpu'" in msg


def test_load_spec_override_into_scalar_field():
    with pytest.raises(SpecError, match="'name' is 'tiny-cpu', not a mapping"):
        load_spec(REPO / "jobs" / "tiny-cpu.yaml", ["name.x=1"])


# ---------------------------------------------------------------- files


def test_missing_file_is_a_spec_error(tmp_path):
    path = tmp_path / "missing.yaml"
    with pytest.raises(SpecError) as ei:
        load_spec(path)
    msg = ei.value.message
    assert str(path) in msg and "No such file" in msg and "YAML job spec" in msg


def test_unreadable_file_is_a_spec_error(tmp_path):
    # a directory cannot be read as a file (works as root too, unlike chmod 000)
    with pytest.raises(SpecError) as ei:
        load_spec(tmp_path)
    assert str(tmp_path) in ei.value.message


def test_invalid_yaml_is_a_spec_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ntrain: {max_steps: [1, 2\n")
    with pytest.raises(SpecError) as ei:
        load_spec(path)
    msg = ei.value.message
    assert str(path) in msg and "not valid YAML" in msg
    assert len(msg.splitlines()) == 1


def test_empty_file_asks_for_name(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(SpecError) as ei:
        load_spec(path)
    assert f"{path}: name: required field is missing" in ei.value.message


def test_yaml_list_is_a_spec_error(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- name: x\n")
    with pytest.raises(SpecError, match="must be a YAML mapping"):
        load_spec(path)


# ---------------------------------------------------------------- schema


def _resolve(schema, node):
    ref = node.get("$ref")
    if ref:
        assert ref.startswith("#/$defs/")
        return schema["$defs"][ref[len("#/$defs/"):]]
    return None


def test_json_schema_describes_every_property_of_every_model():
    schema = json_schema()
    models = {"JobSpec": schema, **schema["$defs"]}
    expected = {"ModelSpec", "TokenizerSpec", "TrainBPE", "DataSpec", "TrainSpec", "DeepSpeedSpec",
                "ScalingSpec", "CheckpointSpec", "FailureSpec", "AutoscalingSpec", "ServeSpec"}
    assert expected <= set(schema["$defs"])
    missing = []
    n_props = 0
    for model_name, model in models.items():
        assert model.get("description"), f"{model_name} has no description"
        assert model.get("additionalProperties") is False, f"{model_name} does not forbid extra fields"
        for prop, node in model.get("properties", {}).items():
            n_props += 1
            desc = node.get("description")
            if not desc:
                # pydantic drops a field's description from a bare $ref when it equals the referenced
                # model's own description; it is then on the definition.
                target = _resolve(schema, node)
                desc = target.get("description") if target else None
            if not (isinstance(desc, str) and desc.strip()):
                missing.append(f"{model_name}.{prop}")
    assert not missing, f"properties without a description: {missing}"
    assert n_props > 60


def test_json_schema_lists_top_level_sections_and_requires_name():
    schema = json_schema()
    assert set(schema["properties"]) == {"name", "model", "tokenizer", "data", "train", "deepspeed", "scaling",
                                         "checkpoint", "failure", "serve", "tracking"}
    assert schema["required"] == ["name"]
    assert schema["$defs"]["DeepSpeedSpec"]["properties"]["zero_stage"]["enum"] == [0, 1, 2, 3]
