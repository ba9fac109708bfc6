"""A real two-node Ray cluster on this machine: a head (``start_local_head``) plus a second raylet that
joins it (``join_local_worker``). The tiny job's corpus is tokenized by Ray Data tasks on both nodes; the
job runs through the SDK with STRICT_SPREAD, one Ray Train worker per node; both ranks' shards land in the
one checkpoint on storage both nodes share (the same disk, declared with ``checkpoint.shared_filesystem``),
and the checkpoint promotes. A node-local storage folder is refused on this cluster before anything is
submitted.

Only processes of this test's two Ray temp dirs are ended (never ``ray stop``): other Ray clusters on
the machine are left alone. Prints the wall time of each phase.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator

import psutil
import pytest

from helpers.local_node import join_local_worker, stop_local_worker
from zeroplane import cluster
from zeroplane.cluster import procs
from zeroplane.checkpoints import list_checkpoints
from zeroplane.datasets import list_datasets, show_dataset
from zeroplane.errors import ZeroplaneError
from zeroplane.spec import load_spec
from zeroplane.storage import Storage

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TIMES: Dict[str, float] = {}


def _alive_nodes(info: cluster.ClusterInfo) -> list:
    return [n for n in cluster.cluster_status(info)["nodes"] if n["alive"]]


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[Dict[str, object]]:
    """Head (1 CPU) + joined worker node (1 CPU); both stopped by their temp dirs afterwards."""
    t0 = time.monotonic()
    mp = pytest.MonkeyPatch()
    home = tempfile.mkdtemp(prefix="zpmn-", dir="/tmp")  # short: Ray's unix socket paths
    worker_dir = tempfile.mkdtemp(prefix="zpmw-", dir="/tmp")
    mp.setenv("ZEROPLANE_HOME", home)
    for var in ("RAY_ADDRESS", "ZEROPLANE_SERVE_PORT"):
        mp.delenv(var, raising=False)
    head_pids: list = []
    try:
        info = cluster.start_local_head(num_cpus=1, bind_host="0.0.0.0")  # a second node must reach it
        head_pids = list(info.pids)
        join_local_worker(info.address, worker_dir, num_cpus=1, resources={"node_b": 1})
        deadline = time.monotonic() + 60
        while len(_alive_nodes(info)) < 2:
            assert time.monotonic() < deadline, f"second node never joined: {cluster.cluster_status(info)}"
            time.sleep(0.5)
        TIMES["cluster up (2 nodes)"] = time.monotonic() - t0
        yield {"info": info, "worker_dir": worker_dir, "home": home}
    finally:
        t1 = time.monotonic()
        ended = stop_local_worker(worker_dir, grace_s=5)
        ended += cluster.stop_local_head(grace_s=5)
        TIMES["cluster down"] = time.monotonic() - t1
        mp.undo()
        # Nothing of ours survives: no head pid, no process referencing either temp dir.
        leftovers = procs._procs_referencing(procs._path_pattern([worker_dir, home]))
        still = [p for p in head_pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        shutil.rmtree(worker_dir, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
        print("\nmulti-node timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in TIMES.items())
              + f"; ended {len(ended)} processes")
        assert not leftovers and not still, (leftovers, still)


def _spec(storage: Path, *extra: str):
    return load_spec(REPO / "jobs" / "tiny-cpu.yaml", [
        f"checkpoint.storage_path={storage}", "scaling.placement_strategy=STRICT_SPREAD",
        "scaling.resources_per_worker={CPU: 1}", "train.max_steps=10", "train.warmup_steps=2",
        "checkpoint.every_n_steps=10", "train.eval_every_n_steps=10", "failure.max_failures=0", *extra])


def test_local_storage_is_refused_on_a_multi_node_cluster(two_nodes, tmp_path):
    from zeroplane.sdk import Client

    zp = Client(address=two_nodes["info"].dashboard_url)
    with pytest.raises(ZeroplaneError, match=r"is a local folder but the cluster .* has 2 nodes.*shared_filesystem"):
        zp.submit(_spec(tmp_path / "storage"))
    assert zp.jobs.list() == []  # refused before anything was sent
    assert not (tmp_path / "storage").exists()


def test_two_node_training_checkpoint_and_promote(two_nodes, tmp_path):
    from ray.util.state import list_actors

    from zeroplane.promote import promote_checkpoint
    from zeroplane.sdk import Client

    info = two_nodes["info"]
    node_ids = {n["node_id"] for n in _alive_nodes(info)}
    assert len(node_ids) == 2

    t0 = time.monotonic()
    zp = Client(address=info.dashboard_url)
    spec = _spec(tmp_path / "storage", "checkpoint.shared_filesystem=true")
    job_id = zp.submit(spec).job_id
    status = zp.wait(job_id, poll_s=1.0, timeout_s=600)
    TIMES["train (submit -> SUCCEEDED)"] = time.monotonic() - t0
    assert status == "SUCCEEDED", zp.jobs.logs(job_id)[-3000:]

    # One Ray Train worker actor on each node (STRICT_SPREAD over 2 nodes with 1 CPU each).
    workers = list_actors(address=info.dashboard_url, filters=[("class_name", "=", "RayTrainWorker")],
                          detail=True, raise_on_missing_output=False)
    assert len(workers) == 2, workers
    assert {w.node_id for w in workers} == node_ids

    # Ray Data tokenized the corpus on both nodes (the manifest names the nodes whose tasks ran).
    storage = Storage.from_uri(str(tmp_path / "storage"))
    (dataset,) = list_datasets(storage)
    assert set(show_dataset(storage, dataset.id)["tokenize_nodes"]) == node_ids

    # Every rank's shard in the one complete checkpoint.
    (ck,) = list_checkpoints(storage, job_id)
    assert ck.step == 10
    files = storage.list_files(ck.path)
    for rank in range(2):
        assert f"ds/step_0000010/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in files, sorted(files)
        assert f"rng/rank_{rank}.pt" in files

    t1 = time.monotonic()
    rec = promote_checkpoint(storage, job_id, "multinode-tiny")
    TIMES["promote"] = time.monotonic() - t1
    assert rec["version"] == "v1" and rec["source"]["job_id"] == job_id and rec["source"]["step"] == 10
    assert (Path(rec["uri"]) / "model.safetensors").is_file()
