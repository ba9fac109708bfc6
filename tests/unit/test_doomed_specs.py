"""Specs that would only fail inside a Ray Train worker are refused by ``zeroplane spec validate``
(exit 2, no cluster), one line naming the field, the value and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from zeroplane.cli.main import main as cli
from zeroplane.errors import SpecError
from zeroplane.spec import load_spec

REPO = Path(__file__).resolve().parents[2]


def _validate(tmp_path, **sections):
    """``zeroplane spec validate`` on jobs/tiny-cpu.yaml with ``sections`` merged in; returns the result."""
    data = yaml.safe_load((REPO / "jobs" / "tiny-cpu.yaml").read_text())
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return CliRunner().invoke(cli, ["spec", "validate", str(path)]), str(path)


def _refused(tmp_path, field: str, fix: str, **sections) -> str:
    res, path = _validate(tmp_path, **sections)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith(f"{path}: {field}")]
    assert len(lines) == 1, res.output
    assert fix in lines[0], lines[0]
    return lines[0]


def test_s3_storage_path_without_bucket_is_refused(tmp_path):
    line = _refused(tmp_path, "checkpoint.storage_path", "s3://bucket/prefix", checkpoint={"storage_path": "s3://"})
    assert '"s3://"' in line


def test_unknown_architecture_is_refused(tmp_path):
    line = _refused(tmp_path, "model.architecture", "gpt2", model={"architecture": "foo"})
    assert '"foo"' in line


@pytest.mark.parametrize("config, fix", [
    ({"n_head": 3, "n_embd": 64}, "n_head"),
    ({"n_layer": "abc"}, "positive whole number"),
    ({"n_layer": -1}, "positive whole number"),
])
def test_bad_model_config_is_refused(tmp_path, config, fix):
    line = _refused(tmp_path, "model.config", fix, model={"config": config})
    assert next(iter(config)) in line


def test_generic_heads_check_for_other_architectures(tmp_path):
    _refused(tmp_path, "model.config", "num_attention_heads",
             model={"architecture": "llama", "preset": None,
                    "config": {"hidden_size": 64, "num_attention_heads": 3, "num_hidden_layers": 2}})


def test_missing_local_data_source_is_refused(tmp_path):
    missing = str(tmp_path / "nope" / "*.txt")
    line = _refused(tmp_path, "data.source", "builtin:pydoc", data={"source": missing})
    assert missing in line


def test_existing_local_data_source_is_accepted(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    res, _ = _validate(tmp_path, data={"source": str(tmp_path / "*.txt")})
    assert res.exit_code == 0, res.output


def test_cpu_job_with_zero_cpu_workers_is_refused(tmp_path):
    line = _refused(tmp_path, "scaling.resources_per_worker", "CPU", scaling={"resources_per_worker": {"CPU": 0}})
    assert "CPU=0" in line


def test_load_spec_raises_spec_error_for_doomed_spec(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: x\nmodel: {architecture: foo}\n")
    with pytest.raises(SpecError) as ei:
        load_spec(path)
    assert ei.value.exit_code == 2


def test_driver_preflight_turns_config_errors_into_spec_errors():
    """What the torch-free validation cannot see (transformers' own type checks) fails in the driver,
    before data preparation and before any worker (so Ray Train never retries it)."""
    from zeroplane.runtime.train.driver import preflight_model_config
    from zeroplane.spec import parse_spec

    spec = parse_spec({"name": "x", "model": {"config": {"activation_function": 3}}})
    with pytest.raises(SpecError) as ei:
        preflight_model_config(spec)
    assert "model.config" in ei.value.message and "activation_function" in ei.value.message


@pytest.mark.parametrize("make, fix", [
    (lambda d: (d / "empty").mkdir() or d / "empty", "matches no file"),  # a folder with no corpus file
    (lambda d: (d / "a.yaml").write_text("x: 1") and d / "*.yaml", "is not one of .txt"),
])
def test_a_local_source_without_corpus_files_is_refused(tmp_path, make, fix):
    source = str(make(tmp_path))
    _refused(tmp_path, "data.source", fix, data={"source": source})


def test_a_model_context_shorter_than_a_sequence_is_refused(tmp_path):
    res, path = _validate(tmp_path, model={"config": {"n_positions": 32}}, data={"seq_len": 64})
    assert res.exit_code == 2 and "n_positions=32 is shorter than data.seq_len=64" in res.output, res.output


@pytest.mark.parametrize("model, fix", [
    ({"config": {"n_layers": 3}}, "did you mean 'n_layer'"),  # transformers would keep the typo and ignore it
    ({"config": {"n_bogus": 3}}, "model.config.n_bogus"),
    ({"architecture": "t5", "preset": None, "config": {}}, "no causal language model"),
])
def test_driver_preflight_refuses_unknown_config_keys_and_non_causal_models(model, fix):
    from zeroplane.runtime.train.driver import preflight_model_config
    from zeroplane.spec import parse_spec

    with pytest.raises(SpecError) as ei:
        preflight_model_config(parse_spec({"name": "x", "model": model}))
    assert fix in ei.value.message


def test_a_key_the_config_class_consumes_is_accepted():
    """llama's rope_theta is taken into rope_parameters by transformers 5: not left behind, not refused."""
    from zeroplane.runtime.train.driver import preflight_model_config
    from zeroplane.spec import parse_spec

    preflight_model_config(parse_spec({"name": "x", "model": {"architecture": "llama", "preset": None, "config": {
        "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 128,
        "rope_theta": 5000.0}}}))


@pytest.mark.parametrize("sections, field, fix", [
    ({"train": {"betas": [1.5, -1]}}, "train.betas", "[0, 1)"),
    ({"deepspeed": {"zero_stage": 2, "overrides": {"zero_optimization": {"stage": 3}}}}, "deepspeed", "set deepspeed.zero_stage"),
    ({"deepspeed": {"overrides": {"train_batch_size": 7}}}, "deepspeed", "train.micro_batch_size_per_worker"),
    ({"checkpoint": {"storage_path": " "}}, "checkpoint.storage_path", "s3://bucket/prefix"),
    ({"scaling": {"use_gpu": False, "resources_per_worker": {"CPU": 1, "GPU": 1}}}, "(top level)", "use_gpu: true"),
])
def test_settings_that_contradict_the_spec_or_the_libraries_are_refused(tmp_path, sections, field, fix):
    _refused(tmp_path, field, fix, **sections)
