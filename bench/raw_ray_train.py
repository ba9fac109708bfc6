"""The baseline of bench/train_bench.py and bench/control_bench.py: the same training, hand-written.

A Ray Train ``TorchTrainer`` with N CPU workers, each running ``deepspeed.initialize`` on a GPT-2 built from
a config and stepping on random token batches; rank 0 prints ``RAW_STEP {"step", "loss", "t"}`` per step
(``t``: Unix seconds). No zeroplane import, no data pipeline, no evaluation, no checkpoints. The DeepSpeed
config, model sizes and step count come as one JSON object in ``$RAW_TRAIN_CONFIG`` (the benchmark fills it
from zeroplane's own ``build_deepspeed_config``):
``{"ds_config": {...}, "model": {GPT2Config kwargs}, "seq_len": 256, "steps": 30, "num_workers": 2, "seed": 0}``.
"""

import json
import os
import time


def train_loop(cfg):
    import deepspeed
    import ray.train
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(cfg["seed"])
    model = GPT2LMHeadModel(GPT2Config(**cfg["model"]))
    n_params = sum(p.numel() for p in set(model.parameters()))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg["ds_config"])
    micro, seq_len, vocab = cfg["ds_config"]["train_micro_batch_size_per_gpu"], cfg["seq_len"], cfg["model"]["vocab_size"]
    gen = torch.Generator().manual_seed(cfg["seed"] + rank)
    if rank == 0:
        print("RAW_STEP " + json.dumps({"step": 0, "parameters": n_params, "pid": os.getpid(), "t": time.time()}), flush=True)
    for step in range(1, cfg["steps"] + 1):
        x = torch.randint(0, vocab, (micro, seq_len), generator=gen)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        if rank == 0:
            print("RAW_STEP " + json.dumps({"step": step, "loss": float(loss), "t": time.time()}), flush=True)


def main():
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = json.loads(os.environ["RAW_TRAIN_CONFIG"])
    ray.init()
    trainer = TorchTrainer(train_loop, train_loop_config=cfg,
                           scaling_config=ScalingConfig(num_workers=cfg["num_workers"], resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(name=f"raw-{int(time.time())}", storage_path=cfg.get("storage_path")))
    trainer.fit()


if __name__ == "__main__":
    main()
