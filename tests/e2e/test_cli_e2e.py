"""The whole product through the CLI, as a user runs it: cluster up -> train submit --wait -> checkpoints
list -> promote -> serve keys create -> HTTP completion -> cluster down. Real Ray head, real HTTP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
ZP = [sys.executable, "-m", "zeroplane.cli.main"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def env(tmp_path):
    e = dict(os.environ)
    e.pop("RAY_ADDRESS", None)
    e.update(ZEROPLANE_HOME=str(tmp_path / "home"), ZEROPLANE_STORAGE=str(tmp_path / "storage"),
             PYTHONUNBUFFERED="1")
    return e


def zp(env, *args, check=True, timeout=900):
    p = subprocess.run([*ZP, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"zeroplane {' '.join(args)} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def test_cli_end_to_end(env, tmp_path):
    serve_port = _free_port()
    zp(env, "cluster", "up", "--dashboard-port", str(_free_port()), "--serve-port", str(serve_port))
    try:
        storage = env["ZEROPLANE_STORAGE"]
        sub = zp(env, "train", "submit", "jobs/tiny-cpu.yaml", "--set", f"checkpoint.storage_path={storage}", "--wait")
        assert "SUCCEEDED" in sub.stdout
        jobs = json.loads(zp(env, "train", "list", "-o", "json").stdout)
        assert len(jobs) == 1 and jobs[0]["status"] == "SUCCEEDED"
        job = jobs[0]["job_id"]

        status = json.loads(zp(env, "train", "status", job, "-o", "json").stdout)
        assert status["val_loss"] < status["val_loss_step0"]
        assert status["result"]["status"] == "SUCCEEDED"

        cks = json.loads(zp(env, "checkpoints", "list", job, "-o", "json").stdout)
        assert [c["step"] for c in cks] == [15, 30] and all(c["complete"] for c in cks)

        rec = json.loads(zp(env, "promote", job, "--name", "tiny", "-o", "json").stdout)
        assert rec["version"] == "v1" and rec["verification"]["ok"]
        assert rec["url"] == f"http://127.0.0.1:{serve_port}/tiny"
        for f in ("config.json", "model.safetensors", "tokenizer.json"):
            assert Path(rec["uri"], f).is_file()

        key = zp(env, "serve", "keys", "create", "--save").stdout.strip()
        url = f"{rec['url']}/v1/completions"
        body = {"prompt": "The try statement", "max_tokens": 12, "temperature": 0}
        assert requests.post(url, json=body, timeout=60).status_code == 401
        r = requests.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["model"] == "tiny:v1" and out["usage"]["completion_tokens"] == 12

        # The answer comes from the promoted weights: greedy generate on the registered folder agrees.
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(rec["uri"])
        model = AutoModelForCausalLM.from_pretrained(rec["uri"]).eval()
        ids = tok(body["prompt"], return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
        assert out["choices"][0]["text"] == tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

        cli = zp(env, "complete", "tiny", "The try statement", "--max-tokens", "5")
        assert cli.stdout.startswith("The try statement")
    finally:
        down = zp(env, "cluster", "down", check=False)
    assert down.returncode == 0 and "stopped" in down.stdout
    assert not Path(env["ZEROPLANE_HOME"], "local-cluster.json").exists()
