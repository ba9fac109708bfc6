"""``train_loop_per_worker``: one DeepSpeed ZeRO rank inside a Ray Train worker.

Per step every rank runs ``gradient_accumulation_steps`` micro-batches of
``[micro_batch_size_per_worker, seq_len]`` tokens, then DeepSpeed's optimizer step. Every
``checkpoint.every_n_steps`` steps (and at the end) every rank saves its DeepSpeed shard, rank 0 adds
the model config, tokenizer, metadata and logits probe, all ranks report the folder to Ray Train (the
folders are merged into one persisted checkpoint) and, once every rank's upload has returned, rank 0
writes the completion marker.

Rank 0 prints one progress line per ``log_every_n_steps`` steps::

    ZEROPLANE_PROGRESS {"step": 10, "max_steps": 100, "loss": 6.9, "tokens_per_s": 1400.0, ...}

Events: ``start`` (with ``worker_pids``, the process id of every rank), ``resumed``, ``eval``, ``step``,
``checkpoint``, ``done``. Every event carries ``t``, rank 0's wall clock (Unix seconds) when it was
printed; the last ``step`` event (before the final checkpoint) and ``done`` carry ``peak_rss_mb``, every
rank's peak resident memory in MB so far; the last ``step`` event also ``live_tensor_mb``, every rank's
bytes held in tensors then (model states and DeepSpeed's buffers, see :func:`_gather_live_tensor_mb`). Every checkpoint's ``meta.json`` also carries the logged loss curve of the whole job so far (``loss_curve``:
``[[step, loss], …]``, restored and extended on resume), the worker pids and the resumes of this job
(``resumes``).

``train.stop_after_steps`` ends the run early (with a checkpoint) while the LR schedule still spans
``max_steps``, so a later resume continues exactly as an uninterrupted run would.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from typing import Any, Dict

from ...names import PROGRESS_PREFIX


def _emit(kind: str, payload: Dict[str, Any]) -> None:
    # Written to the stream directly: Ray Train patches print() in workers to log through its logger
    # and tee to stdout, which would put every progress line in the job log twice.
    sys.stdout.write(PROGRESS_PREFIX + json.dumps({"event": kind, **payload, "t": round(time.time(), 3)}) + "\n")
    sys.stdout.flush()


def _peak_rss_mb() -> float:
    """This process's peak resident set size in MB (``getrusage`` ``ru_maxrss``: KB on Linux, bytes on macOS)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def release_gathered_params(engine: Any, zero_stage: int) -> None:
    """Drop the full parameters a ZeRO-3 forward without backward left gathered (after an evaluation or
    the probe); a no-op for stages 0-2, which never partition parameters.

    Why: ZeRO-3 releases a gathered parameter from its backward hooks, so an inference-only forward keeps
    them: measured at GPT-2 124M (2 ranks, bf16), a rank held the whole 16-bit model (2Ψ bytes, 176 MiB)
    on top of its 8Ψ of partitions after an evaluation, until the next training step. DeepSpeed's own
    ``engine.empty_partition_cache()`` releases them; they are gathered again on their next use.
    """
    if zero_stage == 3:
        engine.empty_partition_cache()


def _gather_peak_rss_mb(world: int) -> list:
    """Every rank's peak RSS in MB, in rank order (a collective: all ranks call it)."""
    import torch
    import torch.distributed as dist

    mine = torch.tensor([_peak_rss_mb()], dtype=torch.float64)
    peaks = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(peaks, mine)
    return [round(float(p), 1) for p in peaks]


def _gather_live_tensor_mb(world: int) -> list:
    """Every rank's live tensor bytes in MB, in rank order (a collective): the sum over the distinct
    storages of every tensor the process still references (``gc`` objects; parameters, gradients,
    optimizer states, DeepSpeed's flat partitions and buckets), i.e. what an allocator's "allocated"
    counter reports, without RSS's runtime, freed-but-kept memory and transient peaks. CPU has no such
    counter in torch, hence the walk (about a second at GPT-2 124M); ``torch.cuda.memory_allocated``
    is the same figure on a GPU."""
    import gc

    import torch
    import torch.distributed as dist

    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.is_meta:
                continue
            storage = obj.untyped_storage()
            key = (storage.data_ptr(), obj.device)
        except (RuntimeError, ReferenceError):  # sparse/opaque tensors, dead weak proxies
            continue
        if key[0] and key not in seen:
            seen.add(key)
            total += storage.nbytes()
    if torch.cuda.is_available():
        total = max(total, torch.cuda.memory_allocated())
    mine = torch.tensor([total / 2**20], dtype=torch.float64)
    out = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(out, mine)
    return [round(float(v), 1) for v in out]


def train_loop_per_worker(config: Dict[str, Any]) -> None:
    """Train one rank. ``config`` is built by the driver (see ``driver.build_train_loop_config``).

    Keys: ``spec`` (JobSpec as dict), ``job_id``, ``tokenizer_files`` ({name: text}), ``dataset`` (the
    prepared dataset's folder and manifest; each rank reads only the sequences it trains on, see
    ``data.open_split``), ``resume_path`` (fs path of a complete checkpoint or None),
    ``storage_uri``.
    """
    import numpy as np
    import ray.train
    import torch
    import torch.distributed as dist

    import deepspeed

    from ... import layout
    from ...layout import dir_name_for_step, tag_for_step
    from ...spec import JobSpec
    from ...spec.deepspeed import build_deepspeed_config
    from ...storage import Storage
    from . import checkpointing
    from .data import BatchOrder, load_tokenizer_files, open_split
    from .modeling import build_model, count_parameters, model_config, probe_ids
    from .tracking import Tracker, model_flop_per_token

    spec = JobSpec.model_validate(config["spec"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    t, seq_len = spec.train, spec.data.seq_len
    work = tempfile.mkdtemp(prefix=f"zeroplane-r{rank}-")
    tokenizer = load_tokenizer_files(config["tokenizer_files"], os.path.join(work, "tokenizer"))
    cfg = model_config(spec.model, len(tokenizer), seq_len, tokenizer.bos_token_id, tokenizer.eos_token_id)
    model = build_model(spec.model, cfg, t.seed)
    n_params = count_parameters(model)
    ds_config = build_deepspeed_config(spec, world, hidden_size=getattr(cfg, "hidden_size", None))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    device = engine.device
    storage = config.get("storage") or Storage.from_uri(config["storage_uri"])
    train_arr, val_arr = open_split(config, "train", storage), open_split(config, "val", storage)  # read on demand
    order = BatchOrder(len(train_arr), t.micro_batch_size_per_worker, world, rank, t.seed)
    accum = t.gradient_accumulation_steps
    pid_t = torch.tensor([os.getpid()], dtype=torch.long)
    pids = [torch.zeros_like(pid_t) for _ in range(world)]
    dist.all_gather(pids, pid_t)
    worker_pids = [int(p) for p in pids]

    # ---- resume: Ray's latest checkpoint if complete, else the newest complete one in storage ----
    start_step, history = 0, {}
    resume_path = checkpointing.pick_resume_path(storage, config["job_id"], ray.train.get_checkpoint(),
                                                 config.get("resume_path"))
    loss_curve: list = []
    resumes: list = []
    if resume_path:
        start_step, history, saved = checkpointing.load(engine, storage, resume_path, rank, world, work)
        loss_curve = [p for p in saved.get("loss_curve", []) if p[0] <= start_step]
        resumes = list(saved.get("resumes", [])) + [{"step": start_step, "from": storage.uri_of(resume_path),
                                                     "at": datetime.now(timezone.utc).isoformat()}]
        if rank == 0:
            _emit("resumed", {"step": start_step, "from": storage.uri_of(resume_path)})
    else:
        torch.manual_seed(t.seed + 1000 * rank)  # dropout stream per rank; restored on resume
    tracker = Tracker.open(spec, config["job_id"], storage, rank, world, start_step,
                           world * t.micro_batch_size_per_worker * accum * seq_len,
                           model_flop_per_token(n_params, cfg, seq_len), ds_config, work)

    def evaluate() -> float:
        engine.eval()
        losses = []
        with torch.no_grad():
            idx = np.arange(rank, len(val_arr), world)[: t.eval_batches * t.micro_batch_size_per_worker]
            if len(idx) == 0:  # more ranks than validation sequences: reuse the first ones
                idx = np.arange(min(len(val_arr), t.micro_batch_size_per_worker))
            for i in range(0, len(idx), t.micro_batch_size_per_worker):
                x = torch.as_tensor(val_arr[idx[i : i + t.micro_batch_size_per_worker]], dtype=torch.long, device=device)
                losses.append(engine(input_ids=x, labels=x).loss.float())
        mean = torch.stack(losses).mean().detach().to(device)
        dist.all_reduce(mean)
        release_gathered_params(engine, spec.deepspeed.zero_stage)
        engine.train()
        return float(mean) / world

    def probe_logits():
        engine.eval()
        with torch.no_grad():
            ids = torch.tensor([probe_ids(tokenizer)], dtype=torch.long, device=device)
            logits = engine(input_ids=ids).logits.float().cpu()
        release_gathered_params(engine, spec.deepspeed.zero_stage)
        engine.train()
        return ids.cpu(), logits

    if rank == 0:
        _emit("start", {"job_id": config["job_id"], "world_size": world, "zero_stage": spec.deepspeed.zero_stage,
                        "parameters": n_params, "train_sequences": len(train_arr),
                        "val_sequences": len(val_arr), "max_steps": t.max_steps, "start_step": start_step,
                        "stop_after_steps": t.stop_after_steps, "worker_pids": worker_pids})
    if start_step == 0:
        history["val_loss_step0"] = evaluate()
        if rank == 0:
            _emit("eval", {"step": 0, "val_loss": history["val_loss_step0"]})
        tracker.log_eval(0, history["val_loss_step0"])

    engine.train()
    tokens_per_step = world * t.micro_batch_size_per_worker * accum * seq_len
    step, val_loss = start_step, history.get("val_loss")
    window_t0, window_tokens = time.perf_counter(), 0
    end_step = min(t.max_steps, t.stop_after_steps or t.max_steps)
    while step < end_step:
        step_loss = torch.zeros((), device=device)
        for a in range(accum):
            k = step * accum + a
            x = torch.as_tensor(train_arr[order.indices(k)], dtype=torch.long, device=device)
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()
            step_loss += loss.detach().float() / accum
        step += 1
        window_tokens += tokens_per_step
        is_eval = step % t.eval_every_n_steps == 0 or step == end_step
        is_ckpt = step % spec.checkpoint.every_n_steps == 0 or step == end_step
        if is_eval:
            val_loss = evaluate()
        if step % t.log_every_n_steps == 0 or is_eval or is_ckpt:
            dist.all_reduce(step_loss)
            elapsed = time.perf_counter() - window_t0
            metrics = {
                "step": step,
                "max_steps": t.max_steps,
                "loss": float(step_loss) / world,
                "lr": float(engine.get_lr()[0]),
                "tokens_per_s": window_tokens / elapsed if elapsed > 0 else 0.0,
                "epoch": round(order.epoch_of(step * accum - 1), 4),
            }
            if is_eval:
                metrics["val_loss"] = val_loss
            if step == end_step:  # before the final checkpoint: the training peak alone
                metrics["peak_rss_mb"] = _gather_peak_rss_mb(world)
                metrics["live_tensor_mb"] = _gather_live_tensor_mb(world)
            if rank == 0:
                _emit("step", metrics)
            tracker.on_log(step, metrics, engine)
            history["train_loss"] = metrics["loss"]
            loss_curve.append([step, metrics["loss"]])
            window_t0, window_tokens = time.perf_counter(), 0
        if is_ckpt:
            history["val_loss"] = val_loss
            report = {
                "step": step,
                "train_loss": history.get("train_loss"),
                "val_loss": val_loss,
                "val_loss_step0": history.get("val_loss_step0"),
            }
            ids, logits = probe_logits()
            local = os.path.join(work, f"ckpt-{step}")
            engine.save_checkpoint(os.path.join(local, layout.CKPT_DEEPSPEED_DIR), tag=tag_for_step(step),
                                   client_state={"zeroplane_step": step})
            checkpointing.save_extras(local, rank, step, tag_for_step(step), report, spec, world,
                                      config["job_id"], tokenizer, cfg, ids, logits,
                                      consumed_micro_batches=step * accum,
                                      extra={"loss_curve": loss_curve, "worker_pids": worker_pids,
                                             "resumes": resumes})
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(local),
                             checkpoint_dir_name=dir_name_for_step(step))
            # report() returns on each rank once its own upload is done; the barrier makes it all ranks.
            dist.barrier()
            if rank == 0:
                persisted = ray.train.get_checkpoint()
                checkpointing.write_marker(persisted, report)
                _emit("checkpoint", {"step": step, "path": persisted.path})
                ck = spec.checkpoint
                checkpointing.apply_retention(storage, config["job_id"], ck.num_to_keep, ck.score_attribute,
                                              ck.score_order)
                tracker.on_checkpoint(step)
            dist.barrier()
            shutil.rmtree(local, ignore_errors=True)
            window_t0 = time.perf_counter()  # checkpoint time is not training throughput
    peaks = _gather_peak_rss_mb(world)
    if rank == 0:
        _emit("done", {"step": step, "val_loss_step0": history.get("val_loss_step0"), "val_loss": val_loss,
                       "peak_rss_mb": peaks,
                       "finished_at": datetime.now(timezone.utc).isoformat()})
    tracker.close()
    shutil.rmtree(work, ignore_errors=True)
