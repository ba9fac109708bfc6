"""The Ray Job entrypoint: ``python -m zeroplane.runtime.train.driver``.

Reads the resolved spec from ``$ZEROPLANE_SPEC_JSON`` and the job id from ``$ZEROPLANE_JOB_ID``,
finds or prepares the dataset (Ray Data -> token shards in the storage), then runs a Ray Train ``TorchTrainer``
whose workers run :func:`zeroplane.runtime.train.loop.train_loop_per_worker`. Writes
``<storage>/jobs/<job_id>/zeroplane_result.json`` at the end and exits non-zero on failure (without the
interpreter's module teardown, see :func:`exit_now`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime, timezone
from typing import Any, Dict

from ... import layout
from ...checkpoints import latest_complete
from ...errors import SpecError
from ...names import ENV_JOB_ID, ENV_SPEC_JSON
from ...spec import JobSpec, parse_spec
from ...storage import Storage


def build_train_loop_config(spec: JobSpec, job_id: str, storage: Storage) -> Dict[str, Any]:
    """Find or prepare the job's dataset (:func:`zeroplane.runtime.train.prepare.ensure_dataset`, Ray Data
    on the connected cluster) and collect everything the workers need: the dataset's location and
    manifest (never its tokens), its tokenizer files, the spec.

    Raises:
        SpecError: bad input (before any worker starts), or fewer tokens than one training and one
            validation sequence of ``data.seq_len``.
    """
    from .prepare import ensure_dataset

    t0 = time.perf_counter()
    ds = ensure_dataset(spec, storage)
    seq_len = spec.data.seq_len
    splits = ds.manifest["splits"]
    n_train, n_val = splits["train"]["tokens"] // seq_len, splits["val"]["tokens"] // seq_len
    if n_train < 1 or n_val < 1:
        raise SpecError(f"data: dataset {ds.id} has {splits['train']['tokens']} training and {splits['val']['tokens']} "
                        f"validation tokens: {n_train} and {n_val} sequences of seq_len={seq_len}; lower "
                        "data.seq_len or give more text")
    newest = latest_complete(storage, job_id)
    print(f"[zeroplane] data: dataset {ds.id}: {n_train:,} train / {n_val:,} val sequences of {seq_len} tokens "
          f"(vocab {ds.manifest['tokenizer']['vocab_size']:,}); ready in {time.perf_counter() - t0:.1f}s", flush=True)
    return {
        "spec": spec.model_dump(mode="json"),
        "job_id": job_id,
        "tokenizer_files": ds.tokenizer_files,
        "dataset": {"id": ds.id, "folder": ds.path, "manifest": {"dtype": ds.manifest["dtype"], "splits": splits}},
        "resume_path": newest.path if newest else None,
        "storage_uri": storage.uri,
        # The Storage itself travels too: its pyarrow filesystem carries the S3 endpoint (and static
        # credentials from this process's environment) into workers that do not share our environment.
        "storage": storage,
    }


def preflight_model_config(spec: JobSpec) -> None:
    """Build the model's transformers config once in the driver, before data preparation and workers.

    The spec's own validation checks the config without transformers (it must not import torch); what
    only transformers can see (e.g. a value of the wrong type for its config class) fails here, in the
    driver, so the job ends at once: Ray Train 2.60 retries every worker-group error up to
    ``failure.max_failures`` times (its failure policy is not configurable), errors outside ``fit()`` never.

    Raises:
        SpecError: transformers refuses ``model.architecture`` or a ``model.config`` value.
    """
    from ...spec.model import model_config

    bpe = spec.tokenizer.train_bpe
    model_config(spec.model, bpe.vocab_size if bpe else 50257, spec.data.seq_len, None, None)


def build_scaling_config(spec: JobSpec):
    """Ray Train's ``ScalingConfig`` for ``spec.scaling`` (field for field; no cluster needed).

    ``num_workers`` workers (one DeepSpeed rank each), each reserving ``resources_per_worker`` (Ray
    logical resources per worker, e.g. ``{CPU: 8, GPU: 1}``), placed with ``placement_strategy``;
    ``use_gpu`` makes Ray Train set up NCCL and one CUDA device per worker; ``accelerator_type`` adds
    Ray's ``accelerator_type:<type>`` resource so workers land on that GPU type only.
    """
    from ray.train import ScalingConfig

    s = spec.scaling
    return ScalingConfig(
        num_workers=s.num_workers,
        use_gpu=s.use_gpu,
        resources_per_worker=dict(s.resources_per_worker),
        placement_strategy=s.placement_strategy,
        accelerator_type=s.accelerator_type,
    )


def build_trainer(spec: JobSpec, job_id: str, storage: Storage, loop_config: Dict[str, Any]):
    """The ``TorchTrainer`` for the job (Ray Train v2 API).

    For ``s3://`` storage, Ray Train persists through ``storage.fs`` (``RunConfig.storage_filesystem``,
    with ``storage_path`` given as ``bucket/prefix/jobs``), the same filesystem zeroplane reads with.
    ``failure.max_failures`` retries only worker loss; a mistake fails at once
    (:class:`zeroplane.runtime.train.failures.WorkerLossOnlyPolicy`). A run that starts again under the
    same name (``train resume``) first has Ray's own checkpoint record set aside
    (:func:`zeroplane.runtime.train.checkpointing.set_aside_ray_snapshot`): it may name checkpoints that
    zeroplane's retention deleted.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    from .checkpointing import set_aside_ray_snapshot
    from .failures import ZeroplaneTorchTrainer
    from .loop import train_loop_per_worker

    set_aside_ray_snapshot(storage, job_id)

    scaling = build_scaling_config(spec)
    run = RunConfig(
        name=job_id,
        storage_path=storage.path(layout.JOBS_DIR),
        storage_filesystem=None if storage.is_local else storage.fs,
        # Retention is zeroplane's (checkpointing.apply_retention, after each marker): Ray's num_to_keep
        # would delete a checkpoint that a registered version came from.
        checkpoint_config=CheckpointConfig(num_to_keep=None),
        failure_config=FailureConfig(max_failures=spec.failure.max_failures),
    )
    return ZeroplaneTorchTrainer(train_loop_per_worker, train_loop_config=loop_config, scaling_config=scaling,
                                 run_config=run)


def main() -> int:
    """Run the job; returns the process exit code (0 success, 1 failure)."""
    import ray

    spec = parse_spec(json.loads(os.environ[ENV_SPEC_JSON]), source=f"${ENV_SPEC_JSON}")
    job_id = os.environ[ENV_JOB_ID]
    storage = Storage.for_checkpoint_spec(spec.checkpoint)
    ray.init(log_to_driver=True)
    started = time.time()
    result_doc: Dict[str, Any] = {"job_id": job_id, "started_at": datetime.now(timezone.utc).isoformat()}
    try:
        preflight_model_config(spec)
        trainer = build_trainer(spec, job_id, storage, build_train_loop_config(spec, job_id, storage))
        result = trainer.fit()
        newest = latest_complete(storage, job_id)
        metrics = dict(result.metrics or {})
        result_doc.update(status="SUCCEEDED", metrics=metrics,
                          checkpoint=newest.uri if newest else None, wall_s=round(time.time() - started, 1))
        print(f"[zeroplane] finished: val_loss {metrics.get('val_loss_step0')} (step 0) -> "
              f"{metrics.get('val_loss')} (step {metrics.get('step')}); checkpoint {result_doc['checkpoint']}",
              flush=True)
        return 0
    except Exception as e:  # the job fails with the reason on its last log line
        result_doc.update(status="FAILED", error=f"{type(e).__name__}: {e}", wall_s=round(time.time() - started, 1))
        print(f"[zeroplane] job failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        result_doc["finished_at"] = datetime.now(timezone.utc).isoformat()
        try:
            storage.write_json(storage.path(layout.result_file(job_id)), result_doc)
        except Exception as e:  # storage trouble must not hide the job's own outcome
            print(f"[zeroplane] could not write {layout.RESULT_FILE}: {e}", file=sys.stderr, flush=True)


def exit_now(code: int) -> None:
    """End the driver process with ``code`` once everything is written, skipping interpreter teardown.

    Python's own exit finalises every module the driver loaded (torch, transformers, Ray Train), which
    takes seconds on a small machine after the job's work is done. Ray is shut down, logging and the
    standard streams are flushed, then ``os._exit``.
    """
    import logging

    import ray

    try:
        ray.shutdown()
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    exit_now(main())
