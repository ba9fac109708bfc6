"""GPU serving check for ``serve.engine: vllm``: deploy a model version with the Serve config zeroplane renders
(Ray Serve LLM's ``build_openai_app``, vLLM underneath) and run the serving benchmark's workloads against it,
next to the ``continuous`` engine on the same GPU.

Prepared for a machine with a CUDA GPU and ``vllm`` installed (``pip install 'ray[llm]'``; vLLM is never a
zeroplane requirement). Not run yet: the development machine has no GPU.

Usage: ``python bench/gpu_serve_vllm.py [--layers 12 --width 768] [--mix-requests 64]``. Exits 2 without a GPU
or without vllm. Writes ``bench/results/gpu_serve_vllm.json`` and prints the same ratios as
``bench/serve_bench.py`` for both engines.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import at_least, machine, table, write_result
from serve_bench import GOALS, http_run, load_ratios, mix_bodies, prompt_of


def build_model(path: Path, layers: int, width: int):
    """A GPT-2 of ``layers`` x ``width`` (1024-token context) with the benchmark's BPE tokenizer, saved to
    ``path`` (a Hugging Face folder vLLM loads)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from serve_bench import CORPUS

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=512, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=layers, n_embd=width, n_head=max(1, width // 64), vocab_size=len(tok),
                     n_positions=1024, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        model.transformer.wte.weight[tok.eos_token_id].zero_()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return tok


def run_engine(url: str, tok, model_field: str, mix: int) -> dict:
    """The serving benchmark's mix and stream workloads against ``url``; returns runs and ratios."""
    def with_model(bodies):
        return [{**b, "model": model_field} for b in bodies]

    stream_body = {"prompt": prompt_of(tok, 32), "max_tokens": 64, "temperature": 0, "stream": True,
                   "model": model_field}
    http_run(url, 1, with_model(mix_bodies(tok, 4, seed=99)))  # warm-up
    bodies = with_model(mix_bodies(tok, mix, seed=1))
    r = {"mix_1": http_run(url, 1, bodies), "mix_16": http_run(url, 16, bodies),
         "stream_1": http_run(url, 1, [stream_body] * 4),
         "stream_16": http_run(url, 16, [stream_body] * 32)}
    r["ratios"] = load_ratios(r)
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=at_least(1), default=12)
    ap.add_argument("--width", type=at_least(64), default=768)
    ap.add_argument("--mix-requests", type=at_least(16), default=64)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU here: this check needs one", file=sys.stderr)
        return 2
    try:
        from ray.serve.llm import build_openai_app  # imports only with vllm (or sglang) installed
    except ImportError as e:
        print(f"vllm is not installed ({e}); pip install 'ray[llm]'", file=sys.stderr)
        return 2

    import ray
    from ray import serve

    from zeroplane.runtime.serve.app import ModelServer
    from zeroplane.serving import vllm_app_config

    t0 = time.monotonic()
    folder = Path(tempfile.mkdtemp(prefix="zeroplane-gpu-bench-"))
    tok = build_model(folder, args.layers, args.width)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/bench"
    deployment = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
                  "ray_actor_options": {"num_gpus": 1}}
    runs = {}
    try:
        vllm_app = vllm_app_config("bench", {"version": "v1", "uri": str(folder)}, deployment, auth=False)
        serve.run(build_openai_app(vllm_app["args"]), name="bench", route_prefix="/bench")
        runs["vllm"] = run_engine(url, tok, "bench:v1", args.mix_requests)
        serve.delete("bench")
        zp_args = {"model_name": "bench", "version": "v1", "model_uri": str(folder), "auth": False,
                   "max_tokens_cap": 128, "max_batch_size": 16, "engine": "continuous"}
        serve.run(ModelServer.options(ray_actor_options={"num_gpus": 1}, max_ongoing_requests=32).bind(zp_args),
                  name="bench", route_prefix="/bench")
        runs["continuous"] = run_engine(url, tok, "bench:v1", args.mix_requests)
    finally:
        serve.shutdown()
        ray.shutdown()
    result = {"benchmark": "gpu_serve_vllm", "machine": machine(), "gpu": torch.cuda.get_device_name(0),
              "model": {"layers": args.layers, "width": args.width}, "goals": GOALS, "engines": runs,
              "total_s": time.monotonic() - t0}
    keys = list(runs["vllm"]["ratios"])
    print(table(["ratio", "goal"] + list(runs), [[k, GOALS[k]] + [runs[e]["ratios"][k] for e in runs] for k in keys]))
    print(f"wrote {write_result('gpu_serve_vllm', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
