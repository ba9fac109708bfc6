"""Promotion: ZeRO checkpoint -> consolidated Hugging Face folder -> verified -> registered version.

Deployment of the registered version is :mod:`zeroplane.serving`. torch, transformers and deepspeed
are imported inside the functions that need them, so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

from . import layout
from .checkpoints import CheckpointInfo, check_local_copy, inspect_checkpoint, latest_complete, list_checkpoints
from .errors import NotFoundError, SpecError, ZeroplaneError, first_line
from .layout import CheckpointRef
from .registry import Registry
from .storage import Storage

#: Largest allowed |logit difference| between the promoted model and the checkpoint-time probe, per
#: dtype. fp32: consolidation copies the fp32 master weights bit for bit, so differences are only
#: summation-order noise (~1e-6); bf16/fp16 casts of the weights move logits by ~1e-2 of their scale.
PROBE_ATOL = {"float32": 1e-4, "bfloat16": 0.25, "float16": 0.05}

#: Unit roundoff of each ``train.precision`` (half the distance from 1 to the next number): bf16 keeps 8
#: significant bits (2^-8), fp16 11 (2^-11), fp32 24 (2^-24).
TRAIN_UNIT_ROUNDOFF = {"fp32": 2.0**-24, "bf16": 2.0**-8, "fp16": 2.0**-11}

#: Safety factor over the measured growth of the training-precision error with depth (see
#: :func:`probe_tolerance`).
PROBE_SAFETY = 4.0


def probe_tolerance(export_dtype: str, train_precision: str, n_layer: int, logit_scale: float) -> float:
    """Largest |logit difference| allowed between the promoted model and the checkpoint-time probe.

    The probe logits are recorded by the training engine, i.e. in ``train_precision``: under bf16 every
    weight and activation is rounded to 8 significant bits, while the promoted model computes in
    ``export_dtype`` from the fp32 master weights (ZeRO 1-3) or the bf16 module weights widened (ZeRO 0).
    Their difference is training-precision rounding, not a promotion fault. Measured on randomly
    initialised GPT-2 models (2, 4 and 12 layers, bf16 vs fp32 forward of the same weights), the largest
    difference grows like ``u * sqrt(n_layer)`` relative to the largest |logit| (0.0039, 0.0064, 0.0126
    for u = 2^-8), the random walk of one rounding per layer. The tolerance is that times
    :data:`PROBE_SAFETY`:

        max(PROBE_ATOL[export_dtype], PROBE_SAFETY * u(train_precision) * sqrt(n_layer) * max(1, logit_scale))

    e.g. bf16, 12 layers, logits up to 10: 4 * 2^-8 * 3.46 * 10 = 0.54 (5.4 % of the scale), while a
    wrong or untied weight moves logits by their whole scale. fp32 training leaves ``PROBE_ATOL`` (the
    export cast) as the bound.

    Args:
        export_dtype: the promoted weights' dtype, a key of :data:`PROBE_ATOL`.
        train_precision: ``fp32`` | ``bf16`` | ``fp16`` (``meta.json``'s ``precision``).
        n_layer: the model's transformer blocks (``config.num_hidden_layers``), >= 1.
        logit_scale: the largest |logit| of the recorded probe.

    Raises:
        SpecError: an unknown ``export_dtype`` or ``train_precision``.
    """
    import math

    if export_dtype not in PROBE_ATOL:
        raise SpecError(f"--dtype {export_dtype!r}: use one of {', '.join(PROBE_ATOL)}")
    if train_precision not in TRAIN_UNIT_ROUNDOFF:
        raise SpecError(f"checkpoint precision {train_precision!r} is unknown; expected one of "
                        f"{', '.join(TRAIN_UNIT_ROUNDOFF)}")
    training = PROBE_SAFETY * TRAIN_UNIT_ROUNDOFF[train_precision] * math.sqrt(max(1, n_layer)) * max(1.0, logit_scale)
    return max(PROBE_ATOL[export_dtype], training)


#: The only classes besides tensors and plain containers that DeepSpeed (0.18.5-0.19) pickles into its
#: checkpoint files, found by saving real ZeRO 0-3 checkpoints (fp32, bf16, CPU offload; fp16 on GPUs
#: adds the dynamic loss scaler) and listing them with ``torch.serialization.get_unsafe_globals_in_checkpoint``.
#: Plain data holders: rebuilding them runs no code of the file's choosing.
DEEPSPEED_CHECKPOINT_CLASSES = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def resolve_checkpoint(storage: Storage, ref: Union[str, CheckpointRef]) -> CheckpointInfo:
    """Find a complete checkpoint from a reference :func:`zeroplane.layout.parse_checkpoint_ref` accepts:
    ``JOB`` (its newest complete checkpoint), ``JOB@STEP``, or a checkpoint folder path
    ``<root>/jobs/<job>/checkpoint_step_NNNNNNN`` (local, ``~`` expanded, or ``s3://``; read through
    ``storage``'s filesystem).

    Args:
        storage: the storage root to look in.
        ref: the reference as the user wrote it, or already parsed.

    Raises:
        SpecError: a malformed reference or job id (see :func:`zeroplane.layout.parse_checkpoint_ref`).
        NotFoundError: nothing complete matches (the message says what was found instead).
    """
    parsed = ref if isinstance(ref, CheckpointRef) else layout.parse_checkpoint_ref(ref)
    job_id, step = parsed.job_id, parsed.step
    if parsed.is_path:
        root = parsed.storage_uri
        root = root[len("s3://"):] if root.startswith("s3://") else str(Path(os.path.expanduser(root)).resolve())
        info = inspect_checkpoint(storage, job_id, f"{root.rstrip('/')}/{layout.checkpoint_dir(job_id, step)}")
        if not info.complete:
            raise NotFoundError(f"checkpoint {ref} is not complete ({info.reason}); it cannot be promoted")
        return info
    if step is not None:
        for c in list_checkpoints(storage, job_id):
            if c.step == step:
                return c
        raise NotFoundError(f"job {job_id!r} has no complete checkpoint at step {step}; see `zeroplane checkpoints list {job_id}`")
    info = latest_complete(storage, job_id)
    if info is None:
        raise NotFoundError(
            f"job {job_id!r} has no complete checkpoint in {storage.uri}; is the job id right and has it reached "
            "its first checkpoint? (`zeroplane checkpoints list JOB`)"
        )
    return info


def consolidate(local_ckpt: Path, out_dir: Path, dtype: str = "float32") -> Dict[str, Any]:
    """Turn a downloaded zeroplane checkpoint into a Hugging Face model folder.

    Uses DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` for ZeRO 1-3 (it rebuilds full fp32
    tensors from every rank's flat partitions and restores shared/tied parameters) and the plain
    module state for stage 0. Loads the state into a model built from the checkpoint's ``hf/config.json``
    (``strict`` except for keys the model ties), re-ties, casts to ``dtype`` and writes
    ``config.json``, ``model.safetensors`` and the tokenizer files.

    Returns:
        ``{"zero_stage", "tag", "parameters", "missing_tied_keys"}``.

    Raises:
        SpecError: unknown ``dtype``.
        ZeroplaneError: a shard holds pickled objects other than tensors (see :func:`load_zero_state`), or
            keys that neither match nor are tied.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    meta = json.loads((local_ckpt / layout.CKPT_META).read_text())
    if dtype not in PROBE_ATOL:
        raise SpecError(f"--dtype {dtype!r}: use one of {', '.join(PROBE_ATOL)}")
    state = load_zero_state(local_ckpt / layout.CKPT_DEEPSPEED_DIR, meta["tag"], meta["zero_stage"])
    config = AutoConfig.from_pretrained(local_ckpt / layout.CKPT_HF_DIR)
    model = AutoModelForCausalLM.from_config(config)
    result = model.load_state_dict(state, strict=False)
    tied = set(_tied_keys(model))
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise ZeroplaneError(
            f"checkpoint {meta['tag']} does not match the model: missing {missing[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}; it cannot be promoted"
        )
    model.tie_weights()
    model = model.to(getattr(torch, dtype))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(local_ckpt / layout.CKPT_HF_DIR).save_pretrained(out_dir)
    return {"zero_stage": meta["zero_stage"], "tag": meta["tag"],
            "parameters": sum(p.numel() for p in set(model.parameters())),
            "missing_tied_keys": sorted(set(result.missing_keys) & tied)}


def load_zero_state(ds_dir: Path, tag: str, zero_stage: int) -> Dict[str, Any]:
    """The full model state of a local DeepSpeed checkpoint folder, unpickling nothing but tensors.

    Stage 0: the module state of ``<ds_dir>/<tag>/mp_rank_00_model_states.pt``; stages 1-3: DeepSpeed's
    ``get_fp32_state_dict_from_zero_checkpoint`` (rebuilds full fp32 tensors from every rank's flat
    partitions and restores shared parameters). Every ``torch.load`` on the way, DeepSpeed's included,
    runs with ``weights_only=True`` (:func:`_weights_only_loads`): a checkpoint comes from storage that
    other people and machines write, and a pickle can run any code in this process.

    Args:
        ds_dir: the checkpoint's ``ds/`` folder (holding ``<tag>/``).
        tag: the DeepSpeed tag, e.g. ``step_0000100``.
        zero_stage: 0-3, from the checkpoint's ``meta.json``.

    Returns:
        ``{parameter name: fp32 tensor on the CPU}``.

    Raises:
        ZeroplaneError: a file holds pickled objects other than tensors, plain containers and
            :data:`DEEPSPEED_CHECKPOINT_CLASSES` (nothing of it was run).
    """
    import torch

    with _weights_only_loads(ds_dir / tag):
        if zero_stage == 0:
            states = torch.load(ds_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
            return {k: v.float() for k, v in states["module"].items()}
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag)


@contextlib.contextmanager
def _weights_only_loads(folder: Path):
    """Make every ``torch.load`` in the body unpickle with ``weights_only=True``, allowing
    :data:`DEEPSPEED_CHECKPOINT_CLASSES`; an object of any other class ends the body with a ZeroplaneError
    naming ``folder``'s offending files.

    DeepSpeed's consolidation calls ``torch.load(..., weights_only=False)`` itself, and the only switch
    torch obeys over an explicit False is ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` (read on every call), so the
    body runs with it set (and ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` unset: both set is an error); both
    are restored afterwards. The variable is process-wide while the body runs: promotion runs in the
    operator's CLI/SDK process, where no other loads are expected meanwhile.
    """
    import importlib

    import torch

    allowed = []
    for dotted in DEEPSPEED_CHECKPOINT_CLASSES:
        module, _, name = dotted.rpartition(".")
        with contextlib.suppress(ImportError, AttributeError):  # absent from this DeepSpeed: not in its files
            allowed.append(getattr(importlib.import_module(module), name))
    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    except pickle.UnpicklingError as e:
        # torch's text goes on with advice to allow-list the class: only its first sentence is kept
        reason = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), first_line(e))
        raise ZeroplaneError(f"refusing to load checkpoint {folder.name}: {_unsafe_files(folder, allowed) or 'a file'} "
                             f"holds pickled objects that are not tensors ({reason.split('. ')[0]}); zeroplane never "
                             "writes such files, so the checkpoint was changed by someone else") from None
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


def _unsafe_files(folder: Path, allowed: list) -> str:
    """``name.pt (global, …)`` for each file of ``folder`` whose pickle names a class not allowed; a
    static scan of the pickle opcodes, nothing is run."""
    import torch

    found = []
    for f in sorted(folder.glob("*.pt")):
        with torch.serialization.safe_globals(allowed), contextlib.suppress(Exception):
            if bad := torch.serialization.get_unsafe_globals_in_checkpoint(str(f)):
                found.append(f"{f.name} ({', '.join(bad)})")
    return "; ".join(found)


def _tied_keys(model) -> list[str]:
    """State-dict keys that alias another parameter in ``model`` (e.g. ``lm_head.weight``)."""
    seen: Dict[int, str] = {}
    tied = []
    for k, p in model.state_dict(keep_vars=True).items():
        if id(p) in seen:
            tied.append(k)
        else:
            seen[id(p)] = k
    return tied


def verify(model_dir: Path, local_ckpt: Path, dtype: str = "float32") -> Dict[str, Any]:
    """Check a consolidated folder loads on its own and reproduces the checkpoint-time probe.

    Checks: ``AutoModelForCausalLM.from_pretrained`` reports no missing, unexpected or mismatched keys;
    when the config ties embeddings, input and output embeddings share storage; the tokenizer loads;
    eval-mode logits on the probe ids equal the logits recorded in the checkpoint within
    :func:`probe_tolerance` of ``dtype`` and the training precision recorded in the checkpoint's
    ``meta.json`` (``fp32`` when absent).

    Returns:
        ``{"ok": bool, "max_abs_logit_diff", "atol", "train_precision", "problems": [...]}``.
    """
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    problems = []
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if info.get(kind):
            problems.append(f"{kind}: {list(info[kind])[:5]}")
    if getattr(model.config, "tie_word_embeddings", False):
        if model.get_input_embeddings().weight.data_ptr() != model.get_output_embeddings().weight.data_ptr():
            problems.append("tie_word_embeddings is set but the LM head is not tied to the input embedding")
    AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor(json.loads((local_ckpt / layout.CKPT_PROBE_IDS).read_text())["input_ids"], dtype=torch.long)
    want = load_file(local_ckpt / layout.CKPT_PROBE_LOGITS)["logits"]
    model.eval()
    with torch.no_grad():
        got = model(input_ids=ids).logits.float()
    diff = float((got - want).abs().max()) if got.shape == want.shape else float("inf")
    precision = json.loads((local_ckpt / layout.CKPT_META).read_text()).get("precision", "fp32")
    atol = probe_tolerance(dtype, precision, model.config.num_hidden_layers, float(want.abs().max()))
    if not diff <= atol:
        problems.append(f"probe logits differ by {diff:.3g} (> {atol:.3g}, the bound for {precision} training "
                        f"exported as {dtype}) from those recorded at checkpoint time")
    return {"ok": not problems, "max_abs_logit_diff": diff, "atol": atol, "train_precision": precision,
            "problems": problems}


def promote_checkpoint(storage: Storage, ref: Union[str, CheckpointRef], name: str, dtype: str = "float32",
                       progress: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Consolidate, verify and register the checkpoint ``ref`` as the next version of ``name``.

    Nothing is registered unless verification passes; a failure leaves the registry as it was.

    Args:
        storage: the storage root holding the checkpoint and the registry.
        ref: ``JOB``, ``JOB@STEP``, a checkpoint folder path, or a parsed reference (see
            :func:`resolve_checkpoint`).
        name: model name (:func:`zeroplane.names.check_name` rules).
        dtype: ``float32`` (default), ``bfloat16`` or ``float16``: the weights' dtype in the version.
        progress: called with one line per stage.

    Returns:
        The registered version record (``name``, ``version``, ``uri``, ``source``, ``verification``).

    Raises:
        SpecError: a malformed ``ref`` or ``name``, or an unknown ``dtype``.
        NotFoundError: no complete checkpoint for ``ref``.
        ZeroplaneError: consolidation or verification failed.
    """
    import contextlib
    import io

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    say = progress or (lambda _msg: None)
    ckpt = resolve_checkpoint(storage, ref)
    work = Path(tempfile.mkdtemp(prefix="zeroplane-promote-"))
    try:
        say(f"downloading checkpoint {ckpt.uri} (step {ckpt.step}, {ckpt.size_bytes / 1e6:.1f} MB)")
        local = storage.download_dir(ckpt.path, work / "ckpt")
        check_local_copy(storage, ckpt.path, local)  # sizes and SHA-256 recorded before the upload
        say("consolidating ZeRO shards into a Hugging Face folder")
        out = work / "model"
        chatter = io.StringIO()  # zero_to_fp32 prints and draws progress bars; errors still raise
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            details = consolidate(local, out, dtype)
        say("verifying: load, keys, tied weights, probe logits")
        check = verify(out, local, dtype)
        if not check["ok"]:
            raise ZeroplaneError(f"verification failed, nothing registered: {'; '.join(check['problems'])}")
        meta = json.loads((local / layout.CKPT_META).read_text())
        record = {
            "source": {"job_id": ckpt.job_id, "step": ckpt.step, "checkpoint": ckpt.uri},
            "metrics": ckpt.metrics,
            "dtype": dtype,
            "consolidation": details,
            "verification": check,
            "serve_defaults": meta.get("spec", {}).get("serve", {}),
        }
        say("registering")
        from .mlflow_link import record_promotion  # + an MLflow model version when the job tracked to MLflow

        return record_promotion(Registry(storage).register(name, out, record), meta.get("spec"), say)
    finally:
        shutil.rmtree(work, ignore_errors=True)
