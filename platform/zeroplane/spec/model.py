"""The job spec: a pydantic v2 schema for one training job and its serving defaults.

This module imports neither ray nor torch, so validating a spec is instant and works on any laptop.
Every field carries a description; that text is the single source for ``zeroplane spec schema``.
Field names follow Ray (``num_workers``, ``storage_path``, ``max_failures``,
``target_ongoing_requests``) and DeepSpeed (``zero_stage``, ``offload_optimizer``).
"""

from __future__ import annotations

import difflib
import functools
import glob
import os
import re
from typing import Any, Dict, List, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ..errors import SpecError
from ..names import DATA_SUFFIXES, DEFAULT_STORAGE, ENV_STORAGE, NAME_RE, NAME_RULE

#: Read for ``tracking.mlflow_uri`` when the spec leaves it out (MLflow's own variable).
ENV_MLFLOW_URI = "MLFLOW_TRACKING_URI"

#: Model-size presets for GPT-2-style configs (keys are transformers ``GPT2Config`` names).
#: ``small`` is about 5.3 M parameters with an 8,192-token vocabulary at seq_len 256.
PRESETS: Dict[str, Dict[str, int]] = {
    "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 2},
    "small": {"n_layer": 4, "n_embd": 256, "n_head": 4},
    "medium": {"n_layer": 8, "n_embd": 512, "n_head": 8},
    "gpt2-124m": {"n_layer": 12, "n_embd": 768, "n_head": 12},
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(_Strict):
    """Which causal LM to train: an architecture built from a config, or a pretrained folder."""

    architecture: str = Field(
        "gpt2",
        description="A transformers causal-LM config type (model_type), e.g. gpt2, llama; the model is "
        "built from scratch from this config unless `pretrained` is set.",
    )
    preset: Optional[Literal["tiny", "small", "medium", "gpt2-124m"]] = Field(
        "small",
        description="Size preset (n_layer/n_embd/n_head for gpt2-style configs): tiny (~0.1 M params at vocab 512), "
        "small (~5 M), medium (~30 M), gpt2-124m. Explicit keys in `config` win over the preset.",
    )
    config: Dict[str, Any] = Field(
        default_factory=dict,
        description="Explicit transformers config keys (e.g. {n_layer: 6, n_embd: 384}); merged over the "
        "preset. vocab_size and n_positions are filled in from the tokenizer and data.seq_len.",
    )
    pretrained: Optional[str] = Field(
        None,
        description="Fine-tune from a Hugging Face model folder (local path); the tokenizer then comes "
        "from that folder too.",
    )
    tie_word_embeddings: bool = Field(
        True, description="Share the input embedding and the LM head weight (GPT-2 default)."
    )

    @field_validator("architecture")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z0-9_\-]+", v):
            raise ValueError(f"'{v}' is not a transformers model_type; use e.g. 'gpt2' or 'llama'")
        types = _transformers_model_types()
        if types is not None and v not in types:
            close = difflib.get_close_matches(v, types, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"'{v}' is not a transformers model type; {hint}use e.g. 'gpt2' or 'llama'")
        return v

    @field_validator("config")
    @classmethod
    def _config_buildable(cls, v: Dict[str, Any], info: ValidationInfo) -> Dict[str, Any]:
        # the config is built even for a pretrained model (the workers build it first), so it is checked too
        if "architecture" not in info.data or "preset" not in info.data:
            return v  # those fields failed already
        arch = info.data["architecture"]
        sizes = _config_kwargs(arch, info.data["preset"], v)
        for key in _POSITIVE_INT_KEYS & set(sizes):
            n = sizes[key]
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"{key}={n!r}: must be a positive whole number, e.g. {key}: 4")
        for width, heads in (("n_embd", "n_head"), ("hidden_size", "num_attention_heads")):
            if width in sizes and heads in sizes and sizes[width] % sizes[heads]:
                raise ValueError(f"{width}={sizes[width]} is not divisible by {heads}={sizes[heads]}; "
                                 f"choose {heads} dividing {width} (e.g. {heads}: {_divisor(sizes[width], sizes[heads])})")
        kv = sizes.get("num_key_value_heads")
        if kv and "num_attention_heads" in sizes and sizes["num_attention_heads"] % kv:
            raise ValueError(f"num_key_value_heads={kv} does not divide num_attention_heads="
                             f"{sizes['num_attention_heads']}; choose a divisor of num_attention_heads")
        return v


# GPT-2 preset keys -> generic transformers names, for architectures other than gpt2.
_GENERIC = {"n_layer": "num_hidden_layers", "n_embd": "hidden_size", "n_head": "num_attention_heads"}
#: Size keys (gpt2 and generic names) that must be positive integers whatever the architecture.
_POSITIVE_INT_KEYS = frozenset({"n_layer", "n_embd", "n_head", "n_inner", "n_positions", "num_hidden_layers",
                                "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                                "max_position_embeddings", "vocab_size"})


def _divisor(width: int, heads: int) -> int:
    """The divisor of ``width`` nearest to ``heads`` (for the fix in an error message)."""
    return min((d for d in range(1, width + 1) if width % d == 0), key=lambda d: (abs(d - heads), d))


def _config_kwargs(architecture: str, preset: Optional[str], config: Dict[str, Any],
                   seq_len: Optional[int] = None) -> Dict[str, Any]:
    """The size keys of the transformers config: the preset (renamed for non-gpt2 types) under
    ``config``, plus the context length when ``seq_len`` is given."""
    sizes: Dict[str, Any] = dict(PRESETS[preset]) if preset else {}
    if architecture != "gpt2":
        sizes = {_GENERIC[k]: v for k, v in sizes.items()}
        if "hidden_size" in sizes:
            sizes.setdefault("intermediate_size", 4 * sizes["hidden_size"])
    sizes.update(config)
    if seq_len is not None:
        sizes.setdefault("n_positions" if architecture == "gpt2" else "max_position_embeddings", seq_len)
    return sizes


# ---- transformers' model types, read without importing its configuration code ----------------------
# transformers 5.x imports torch from configuration_utils whenever torch is installed (~2 s), and
# validation must stay light (tests/unit/test_platform_guard.py). So the model types come from the
# generated, import-free ``transformers.models.auto.auto_mappings``; sizes are checked here, and the job
# driver builds the real config (which checks every key) before data preparation and any worker starts.


@functools.lru_cache(maxsize=1)
def _transformers_model_types() -> Optional[List[str]]:
    """transformers' model types (keys of ``CONFIG_MAPPING_NAMES``), or None when unavailable."""
    try:
        from transformers.models.auto import auto_mappings
    except Exception:
        return None
    return sorted({"gpt-sw3", *auto_mappings.CONFIG_MAPPING_NAMES})


def model_config(spec: ModelSpec, vocab_size: int, seq_len: int, bos_id: int | None, eos_id: int | None):
    """The transformers config for a model built from scratch.

    Preset sizes are merged under ``spec.config``; ``vocab_size`` and the context length
    (``n_positions`` / ``max_position_embeddings`` = ``seq_len``) come from the tokenizer and data.

    Imports ``transformers`` (and with it torch) when called; the control plane (``zeroplane train
    estimate``), the job driver's preflight and the training workers build the model's config here.

    Args:
        spec: the ``model`` section.
        vocab_size: the tokenizer's vocabulary size.
        seq_len: the context length (``data.seq_len``).
        bos_id, eos_id: the tokenizer's special token ids, or None.

    Returns:
        A ``transformers.PretrainedConfig`` of type ``spec.architecture``.

    Raises:
        SpecError: ``spec.architecture`` is not a transformers model type or has no causal-LM class, a
        ``spec.config`` key is not a setting of its config class, or transformers refuses a value.
    """
    from transformers import AutoConfig

    sizes = _config_kwargs(spec.architecture, spec.preset, spec.config, seq_len)
    try:
        cfg = AutoConfig.for_model(
            spec.architecture,
            vocab_size=vocab_size,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            tie_word_embeddings=spec.tie_word_embeddings,
            **sizes,
        )
    except ValueError as e:
        raise SpecError(f"model.architecture = {spec.architecture!r}: {e}; use a transformers model type such as gpt2") from None
    except Exception as e:  # huggingface_hub's StrictDataclass*ValidationError: a bad config value
        if type(e).__name__.startswith("StrictDataclass"):
            detail = " ".join(str(e).split())
            raise SpecError(f"model.config ({spec.architecture}): {detail}; fix that key in model.config") from None
        raise
    _check_causal_lm(spec.architecture)
    _check_config_keys(spec.architecture, spec.config, cfg)
    return cfg


def _check_causal_lm(architecture: str) -> None:
    """Refuse a model type that transformers has no causal-LM class for (e.g. t5, an encoder-decoder)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if architecture not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and architecture != "gpt-sw3":
        raise SpecError(f"model.architecture = {architecture!r}: transformers has no causal language model "
                        f"(AutoModelForCausalLM) for it; use a decoder model type such as gpt2 or llama")


def _check_config_keys(architecture: str, config: Dict[str, Any], cfg) -> None:
    """Refuse a ``model.config`` key that the config class neither knows nor consumed: transformers keeps
    any unknown keyword as a plain attribute, so a typo (``n_layers`` for ``n_layer``) would be silently
    ignored. A key the class consumes into another field (llama's ``rope_theta`` into ``rope_parameters``)
    is not left behind as an attribute and passes."""
    import inspect

    cls = type(cfg)
    try:
        known = set(cls().to_dict()) | set(getattr(cls, "attribute_map", {})) | set(inspect.signature(cls.__init__).parameters)
    except Exception:  # a config class without usable defaults: nothing to compare against
        return
    unknown = [k for k in config if k not in known and k in vars(cfg)]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise SpecError(f"model.config.{key}: not a setting of the {architecture} config ({cls.__name__}); {hint}"
                        "remove it or use one of its keys")


class TrainBPE(_Strict):
    """Train a byte-level BPE tokenizer on the training text."""

    vocab_size: int = Field(8192, ge=260, le=262144, description="Vocabulary size of the trained BPE, incl. special tokens.")
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for a BPE merge.")


class TokenizerSpec(_Strict):
    """Where the tokenizer comes from. It is saved with every checkpoint and model version."""

    train_bpe: Optional[TrainBPE] = Field(
        default_factory=TrainBPE,
        description="Train a byte-level BPE on the dataset (set to null to use `path` or the pretrained model's).",
    )
    path: Optional[str] = Field(None, description="A local Hugging Face tokenizer folder to use instead of training one.")


class DataSpec(_Strict):
    """The training text, and how it is prepared into token shards (``datasets/<fingerprint>/``)."""

    source: str = Field(
        "builtin:pydoc",
        description="builtin:pydoc (the Python reference text in pydoc_data.topics, ships with CPython), "
        "a local file, folder or glob, or s3://bucket/key, s3://bucket/prefix or s3://bucket/prefix/*.jsonl; "
        "files: .txt, .jsonl, .jsonl.gz, .jsonl.zst (field `text_field`), .parquet (column `text_field`).",
    )
    text_field: str = Field("text", description="Field holding the text in .jsonl records and .parquet rows.")
    on_bad_record: Literal["fail", "skip"] = Field(
        "fail",
        description="A .jsonl line that is not a JSON object with a string `text_field`, or an empty file: "
        "fail (the error names the file and line) or skip (counted in the dataset's manifest).",
    )
    seq_len: int = Field(256, ge=8, le=32768, description="Tokens per training sequence.")
    validation_fraction: float = Field(
        0.05, gt=0.0, lt=0.5,
        description="Share of documents held out for validation, chosen per document by a hash of its text "
        "(a .txt file or builtin topic is split into paragraphs at blank lines for this), so the split "
        "stays the same when the corpus grows.",
    )
    max_chars: Optional[int] = Field(
        None, ge=1000,
        description="Use only the first documents of the source (in file order) until they hold this many "
        "characters; the document that reaches the limit is the last (quick experiments).",
    )
    tokenizer_sample_chars: int = Field(
        20_000_000, ge=10_000,
        description="Characters a trained BPE learns from: the beginnings of up to 32 files spread evenly "
        "over the sorted source (the first files when max_chars is set), never the whole corpus.",
    )
    shard_tokens: int = Field(
        1 << 24, ge=1024,
        description="Tokens per shard file of a prepared dataset (16,777,216 = 32 MiB of uint16).",
    )

    @field_validator("source")
    @classmethod
    def _source_kind(cls, v: str, info: ValidationInfo) -> str:
        if v.startswith("s3://") and not v[len("s3://"):].split("/", 1)[0]:
            raise ValueError("no bucket; use s3://bucket/key")
        if v.startswith("builtin:") and v != "builtin:pydoc":
            raise ValueError(f"unknown builtin corpus '{v}'; the only builtin is 'builtin:pydoc'")
        if v.startswith("hf:"):
            raise ValueError(
                f"'{v}': hub datasets are not supported; download it and point `source` at local .txt/.jsonl files"
            )
        # A local source is read by the job driver; it is checked where the spec is resolved (load_spec:
        # `spec validate`, `train submit`), i.e. on the submitting machine. On a cluster whose nodes do not
        # share this filesystem the file must also exist on the driver's node, which this cannot see.
        if (info.context or {}).get("local_files") and not v.startswith(("builtin:", "s3://")):
            paths = local_source_paths(v)  # the driver's own listing (zeroplane.datasets.list_source)
            if not paths:
                raise ValueError(f"matches no file; give a file, folder or glob holding {', '.join(DATA_SUFFIXES)} "
                                 "files, builtin:pydoc, or s3://bucket/key")
            bad = next((p for p in paths if not p.lower().endswith(DATA_SUFFIXES)), None)
            if bad:
                raise ValueError(f"{bad!r} is not one of {', '.join(DATA_SUFFIXES)}; rename it or convert it")
        return v


def local_source_paths(source: str) -> List[str]:
    """The files a local ``data.source`` names: a glob's matching files, a folder's files with one of
    :data:`zeroplane.names.DATA_SUFFIXES` (recursively), or the file itself; ``[]`` when none (unsorted)."""
    pattern = os.path.expanduser(source)
    if glob.has_magic(pattern):
        return [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
    if os.path.isdir(pattern):
        return [os.path.join(d, f) for d, _, names in os.walk(pattern) for f in names if f.lower().endswith(DATA_SUFFIXES)]
    return [pattern] if os.path.isfile(pattern) else []


class TrainSpec(_Strict):
    """Optimisation settings. Step counts are optimizer steps (after gradient accumulation)."""

    max_steps: int = Field(300, ge=1, description="Total optimizer steps of the job.")
    micro_batch_size_per_worker: int = Field(8, ge=1, description="Sequences per worker per forward/backward.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(3.0e-4, gt=0.0, le=1.0, description="Peak learning rate (AdamW).")
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps from 0 to lr.")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas, each in [0, 1).")
    grad_clip: float = Field(1.0, ge=0.0, description="Gradient clipping norm (0 disables).")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple) -> tuple:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"{list(v)}: each AdamW beta must be in [0, 1) (Kingma & Ba 2015), e.g. [0.9, 0.95]")
        return v
    seed: int = Field(0, ge=0, description="Seed for model init, data order and dropout.")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Training precision: fp32 | bf16 | fp16.")
    eval_every_n_steps: int = Field(50, ge=1, description="Validation-loss period in steps (also at step 0 and the end).")
    eval_batches: int = Field(8, ge=1, description="Validation micro-batches per worker per evaluation.")
    log_every_n_steps: int = Field(1, ge=1, description="Progress line period in steps.")
    stop_after_steps: Optional[int] = Field(
        None, ge=1,
        description="End this run after this optimizer step (with a checkpoint) without changing the LR "
        "schedule, which still runs to max_steps; `zeroplane train resume` continues to max_steps. "
        "null: run to max_steps.",
    )

    @model_validator(mode="after")
    def _warmup_fits(self) -> "TrainSpec":
        if self.warmup_steps >= self.max_steps:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} must be below max_steps={self.max_steps}; lower warmup_steps"
            )
        if self.stop_after_steps is not None and self.stop_after_steps > self.max_steps:
            raise ValueError(
                f"stop_after_steps={self.stop_after_steps} is above max_steps={self.max_steps}; "
                "lower it or set it to null"
            )
        return self


class DeepSpeedSpec(_Strict):
    """DeepSpeed ZeRO settings; the full DeepSpeed config is generated from the whole spec."""

    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage: 0 (DDP-like), 1 (optimizer states), 2 (+gradients), 3 (+parameters).")
    offload_optimizer: Literal["none", "cpu"] = Field("none", description="Offload optimizer states to CPU (ZeRO-Offload; stage 1-3).")
    offload_param: Literal["none", "cpu"] = Field("none", description="Offload parameters to CPU (ZeRO-Infinity style; stage 3 only).")
    overrides: Dict[str, Any] = Field(
        default_factory=dict, description="Merged last (recursively) into the generated DeepSpeed config."
    )

    @model_validator(mode="after")
    def _offload_needs_stage(self) -> "DeepSpeedSpec":
        if self.offload_param != "none" and self.zero_stage != 3:
            raise ValueError(
                f"offload_param={self.offload_param!r} needs zero_stage 3 (got {self.zero_stage}); "
                "set deepspeed.zero_stage: 3 or offload_param: none"
            )
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise ValueError(
                f"offload_optimizer={self.offload_optimizer!r} needs zero_stage 1-3 (got 0); "
                "raise deepspeed.zero_stage or set offload_optimizer: none"
            )
        # what the spec itself sets (and reports, and checkpoints record) must not be changed behind it
        zero = self.overrides.get("zero_optimization")
        if isinstance(zero, dict) and "stage" in zero and zero["stage"] != self.zero_stage:
            raise ValueError(f"overrides.zero_optimization.stage={zero['stage']!r} contradicts zero_stage="
                             f"{self.zero_stage}; set deepspeed.zero_stage instead")
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            if key in self.overrides:
                raise ValueError(f"overrides.{key}: comes from the train and scaling sections; set "
                                 "train.micro_batch_size_per_worker, train.gradient_accumulation_steps or "
                                 "scaling.num_workers instead")
        return self


class ScalingSpec(_Strict):
    """Maps onto Ray Train's ScalingConfig."""

    num_workers: int = Field(2, ge=1, le=4096, description="Ray Train workers (one DeepSpeed rank each).")
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL) instead of CPU (gloo).")
    resources_per_worker: Dict[str, float] = Field(
        default_factory=lambda: {"CPU": 1}, description="Ray resources each worker reserves, e.g. {CPU: 4, GPU: 1}."
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement-group strategy for the workers."
    )
    accelerator_type: Optional[str] = Field(None, description="Ray accelerator type, e.g. A100 or H100.")

    @field_validator("resources_per_worker")
    @classmethod
    def _non_negative(cls, v: Dict[str, float]) -> Dict[str, float]:
        for k, n in v.items():
            if n < 0:
                raise ValueError(f"resources_per_worker.{k}={n} is negative; use a count >= 0")
        return v

    @field_validator("resources_per_worker")
    @classmethod
    def _cpu_worker_has_cpu(cls, v: Dict[str, float], info: ValidationInfo) -> Dict[str, float]:
        cpu = v.get("CPU", 1)
        if not info.data.get("use_gpu", False) and cpu <= 0:
            raise ValueError(f"resources_per_worker.CPU={cpu:g} on a CPU job (use_gpu false): a worker without a "
                             "CPU cannot run; give each worker CPU: 1 or more, or set scaling.use_gpu: true")
        return v


class CheckpointSpec(_Strict):
    """Where and how often checkpoints are persisted (Ray Train RunConfig/CheckpointConfig)."""

    storage_path: str = Field(
        default_factory=lambda: os.environ.get(ENV_STORAGE) or DEFAULT_STORAGE,
        description="Local folder or s3://bucket/prefix holding checkpoints, the model registry and versions "
        "(default: $ZEROPLANE_STORAGE where the spec is resolved, else ~/.zeroplane/storage — the storage every "
        "other command defaults to).",
    )
    shared_filesystem: bool = Field(
        False,
        description="The local storage_path is one filesystem mounted on every Ray node (NFS, EFS, a shared "
        "volume). Required for a local storage_path on a multi-node cluster; ignored for s3://.",
    )
    every_n_steps: int = Field(100, ge=1, description="Checkpoint period in steps (a checkpoint is also taken at the end).")
    num_to_keep: Optional[int] = Field(3, ge=1, description="Complete checkpoints kept (older ones deleted); null keeps all.")
    s3_endpoint_url: Optional[str] = Field(
        None,
        description="Endpoint of an S3-compatible server (e.g. http://minio:9000) for an s3:// storage_path; "
        "default: $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL, else AWS. Credentials always come from the "
        "environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the AWS default chain), never the spec.",
    )
    score_attribute: Optional[str] = Field(None, description="Metric that ranks checkpoints for retention, e.g. val_loss.")
    score_order: Literal["min", "max"] = Field("min", description="Whether a lower (min) or higher (max) score is better.")


    @field_validator("storage_path")
    @classmethod
    def _s3_has_bucket(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("empty; give a local folder or s3://bucket/prefix, or leave it out for "
                             f"$ZEROPLANE_STORAGE / {DEFAULT_STORAGE}")
        if v.startswith("s3://") and not v[len("s3://"):].split("/", 1)[0]:
            raise ValueError("no bucket; use s3://bucket/prefix or a local folder")
        return v

    @field_validator("s3_endpoint_url")
    @classmethod
    def _endpoint_is_url(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and "@" in v.split("//", 1)[-1].split("/", 1)[0]:
            # the spec travels in the job request and is printed by --dry-run: no secret belongs in it
            raise ValueError("credentials do not belong in the endpoint URL (the spec is shown and sent with every "
                             "job); give http(s)://host[:port] and the keys through the environment")
        if v is not None and not re.fullmatch(r"https?://[^/\s]+/?", v):
            raise ValueError(f"'{v}' is not an endpoint URL; use http(s)://host[:port], without a path")
        return v


class FailureSpec(_Strict):
    """Ray Train FailureConfig."""

    max_failures: int = Field(2, ge=-1, description="Worker-group restarts from the last checkpoint before the job fails (-1: unlimited).")


class AutoscalingSpec(_Strict):
    """Ray Serve autoscaling_config."""

    min_replicas: int = Field(1, ge=0, description="Replicas kept when idle (0 scales to zero).")
    max_replicas: int = Field(4, ge=1, description="Upper bound on replicas.")
    target_ongoing_requests: float = Field(2, gt=0, description="Ongoing requests per replica the autoscaler aims for.")
    upscale_delay_s: float = Field(10.0, ge=0, description="Seconds of sustained load before scaling up.")
    downscale_delay_s: float = Field(30.0, ge=0, description="Seconds of low load before scaling down.")

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingSpec":
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas={self.min_replicas} is above max_replicas={self.max_replicas}; raise max_replicas"
            )
        return self


#: The Ray actor options a replica may get from a spec or a flag. Others (``runtime_env`` above all: pip
#: packages and environment variables) would let a job's author run code on the serving cluster.
REPLICA_ACTOR_OPTIONS = ("num_cpus", "num_gpus", "memory", "accelerator_type", "resources")


def check_replica_actor_options(options: Dict[str, Any], field: str) -> None:
    """Refuse replica actor options outside :data:`REPLICA_ACTOR_OPTIONS`.

    Raises:
        SpecError: names the field, the key and the allowed keys.
    """
    extra = sorted(set(options or {}) - set(REPLICA_ACTOR_OPTIONS))
    if extra:
        raise SpecError(f"{field}: {', '.join(extra)} not allowed for serving replicas; use only "
                        f"{', '.join(REPLICA_ACTOR_OPTIONS)}")


class ReleaseSpec(_Strict):
    """How a gated canary release advances (``promote|serve deploy --canary P --gate``; see
    :mod:`zeroplane.gates` and :mod:`zeroplane.runtime.release`)."""

    steps: List[float] = Field(
        default_factory=lambda: [10.0, 50.0, 100.0],
        description="Canary traffic percent at each step after the first window that passes its gates; the "
        "last must be 100 (the canary becomes the stable version).")
    window_s: float = Field(60.0, ge=5, le=86400, description="Seconds of traffic each decision looks at.")
    max_error_rate: float = Field(0.01, ge=0, le=1, description="Largest canary error rate (status >= 400) in a window.")
    max_p95_latency_ratio: float = Field(1.5, gt=1, description="Largest canary p95 latency / stable p95 latency in a window.")
    min_requests: int = Field(20, ge=1, description="Canary requests a window needs before it decides anything.")
    max_wait_windows: int = Field(3, ge=1, description="Windows in a row with fewer than min_requests before the "
                                                      "release is rolled back (too little traffic to judge).")
    max_bits_per_byte_increase: Optional[float] = Field(
        0.05, ge=0,
        description="Held-out evaluation before any traffic moves: the canary's bits per byte on held-out text "
        "may exceed the stable version's by at most this much (null: no evaluation).")
    eval_chars: int = Field(20000, ge=100, le=10_000_000, description="Characters of held-out text evaluated.")

    @field_validator("steps")
    @classmethod
    def _steps_ok(cls, v: List[float]) -> List[float]:
        if not v or v[-1] != 100 or any(not 0 < p <= 100 for p in v) or any(a >= b for a, b in zip(v, v[1:])):
            raise ValueError(f"{v}: give increasing percents in (0, 100] ending with 100, e.g. [10, 50, 100]")
        return v


class ServeSpec(_Strict):
    """Defaults used by `zeroplane promote` when it deploys a version with Ray Serve.

    The single source of the serving defaults and bounds: the Serve application's arguments
    (``zeroplane.runtime.serve.protocol.ServeAppArgs``) take ``auth``, ``max_tokens_cap``, ``max_batch_size``,
    ``batch_wait_timeout_s`` and ``engine`` from these fields.
    """

    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec, description="Ray Serve autoscaling_config.")
    ray_actor_options: Dict[str, Any] = Field(
        default_factory=lambda: {"num_cpus": 0.5},
        description="Ray actor options of each replica, only " + ", ".join(REPLICA_ACTOR_OPTIONS) + ".")
    max_tokens_cap: int = Field(256, ge=1, description="Largest max_tokens a request may ask for.")
    max_batch_size: int = Field(8, ge=1, description="Most requests in one forward pass of a replica (engine "
                                                     "continuous: the running batch; generate: one generate call).")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="How long a replica waits to fill a batch.")
    engine: Literal["continuous", "generate", "vllm"] = Field(
        "continuous", description="Generation engine of each replica: 'continuous' (transformers' continuous "
                                  "batching: every request, greedy or sampled, streaming or not, in one running "
                                  "batch), 'generate' (batched generate for greedy non-streaming requests only) or "
                                  "'vllm' (Ray Serve LLM's OpenAI app with vLLM; GPU nodes with vllm installed).")
    auth: bool = Field(True, description="Require a bearer API key (zeroplane serve keys create). Only true in a "
                                         "job spec: keys are turned off at deploy time (--no-auth), never by a spec.")
    release: ReleaseSpec = Field(default_factory=ReleaseSpec, description="Gated canary releases (--gate).")

    @field_validator("ray_actor_options")
    @classmethod
    def _actor_options_ok(cls, v: Dict[str, Any]) -> Dict[str, Any]:
        check_replica_actor_options(v, "serve.ray_actor_options")
        return v

    @field_validator("auth")
    @classmethod
    def _auth_on(cls, v: bool) -> bool:
        if v is not True:
            raise ValueError("a job spec cannot turn API keys off (whoever promotes it would serve without keys "
                             "unawares); remove serve.auth and deploy with --no-auth if you mean it")
        return v


class TrackingSpec(_Strict):
    """Where a job's metrics go besides its log: TensorBoard event files in its run folder (always, unless
    turned off) and, optionally, an MLflow tracking server (a run per job, a registered model version per
    promotion)."""

    tensorboard: bool = Field(
        True,
        description="Rank 0 writes TensorBoard event files to <storage_path>/jobs/<job>/tensorboard (train and "
        "validation loss, learning rate, gradient norm, tokens/s, model FLOP/s, peak memory per rank, checkpoints); "
        "`zeroplane train tensorboard JOB` serves them, `zeroplane train plot JOB` plots them.",
    )
    mlflow_uri: Optional[str] = Field(
        default_factory=lambda: os.environ.get(ENV_MLFLOW_URI) or None,
        description="MLflow tracking server, http(s)://host[:port] (default: $MLFLOW_TRACKING_URI where the spec "
        "is resolved; null: no MLflow). Credentials come from the environment (MLFLOW_TRACKING_TOKEN, "
        "MLFLOW_TRACKING_USERNAME / _PASSWORD), never the spec.",
    )
    mlflow_experiment: str = Field("zeroplane", min_length=1, max_length=500,
                                   description="MLflow experiment holding the job's run (created if absent).")
    mlflow_timeout_s: float = Field(
        5.0, gt=0, le=60,
        description="Bound on each MLflow request from the job (no retries within a period: a failed send is "
        "retried at the next logging period). Training never waits for MLflow: a background thread sends.",
    )
    upload_every_s: float = Field(
        30.0, gt=0,
        description="s3:// storage: rank 0 writes event files locally and uploads them at the first logging "
        "period this many seconds after the last upload, at every checkpoint and at the end.",
    )

    @field_validator("mlflow_uri")
    @classmethod
    def _mlflow_uri_ok(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", v):
            raise ValueError(f"'{v}' is not an MLflow tracking server URL; use http(s)://host[:port] "
                             "(a local file or database would be on whichever node runs rank 0)")
        if "@" in v.split("//", 1)[-1].split("/", 1)[0]:
            raise ValueError("credentials do not belong in the tracking URI (the spec is shown and sent with every "
                             "job); give http(s)://host[:port] and MLFLOW_TRACKING_TOKEN or _USERNAME/_PASSWORD "
                             "through the environment")
        return v


class JobSpec(_Strict):
    """One training job: what to train, on what, how, where to keep it, and how to serve it."""

    name: str = Field(..., description="Job name, [a-z0-9-] up to 48 chars; used in storage paths and Ray job ids.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="The causal LM.")
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec, description="The tokenizer.")
    data: DataSpec = Field(default_factory=DataSpec, description="The training text.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="Optimisation settings.")
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec, description="DeepSpeed ZeRO settings.")
    scaling: ScalingSpec = Field(default_factory=ScalingSpec, description="Ray Train scaling.")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Checkpoint persistence.")
    failure: FailureSpec = Field(default_factory=FailureSpec, description="Fault tolerance.")
    serve: ServeSpec = Field(default_factory=ServeSpec, description="Serving defaults for promote.")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="TensorBoard and MLflow tracking.")

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError(f"'{v}' is not a valid job name; {NAME_RULE}")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> "JobSpec":
        if self.train.precision == "bf16" and not self.scaling.use_gpu:
            pass  # bf16 on CPU works in torch; allowed.
        if self.train.precision == "fp16" and not self.scaling.use_gpu:
            raise ValueError(
                "train.precision='fp16' needs GPUs (loss scaling on CPU is unsupported); "
                "use precision fp32 or bf16, or set scaling.use_gpu: true"
            )
        if self.scaling.use_gpu and self.scaling.resources_per_worker.get("GPU", 1) < 1:
            raise ValueError("scaling.use_gpu is true but resources_per_worker.GPU < 1; give each worker one GPU")
        if not self.scaling.use_gpu and self.scaling.resources_per_worker.get("GPU", 0) > 0:
            raise ValueError(f"scaling.resources_per_worker.GPU={self.scaling.resources_per_worker['GPU']:g} on a CPU "
                             "job: Ray Train refuses GPUs per worker without use_gpu; set scaling.use_gpu: true or "
                             "remove GPU")
        sizes = _config_kwargs(self.model.architecture, self.model.preset, self.model.config)
        for key in ("n_positions", "max_position_embeddings"):  # the context is data.seq_len unless set
            if isinstance(sizes.get(key), int) and sizes[key] < self.data.seq_len:
                raise ValueError(f"model.config.{key}={sizes[key]} is shorter than data.seq_len={self.data.seq_len}: "
                                 f"the model could not see a whole training sequence; remove {key} (it follows "
                                 f"data.seq_len) or lower data.seq_len to {sizes[key]}")
        return self
