"""A second Ray node on this machine that joins a local head, for trying multi-node behaviour on one
machine (two raylets, one GCS). Test-only: zeroplane itself never starts worker nodes.

Like the local head, the node is found and ended only through its own private temp dir (never
``ray stop``, never a kill by process name), so nothing else on the machine is touched.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Dict, List, Optional

from zeroplane.cluster import auth_env
from zeroplane.cluster.local import _free_ports, _run_ray_start
from zeroplane.cluster.procs import _collect_head_procs, _end_node_procs
from zeroplane.cluster.state import _prepare_temp_dir
from zeroplane.errors import SpecError


def join_local_worker(
    head_address: str,
    temp_dir: str,
    num_cpus: int = 1,
    resources: Optional[Dict[str, float]] = None,
    timeout_s: float = 60,
) -> List[int]:
    """Start a second Ray node on this machine that joins the cluster at ``head_address``.

    ``ray start --address`` with its own ``temp_dir`` (logs, sockets), free ports, and the same token
    authentication as the head (``RAY_AUTH_MODE=token`` when a token is available). Stop it with
    :func:`stop_local_worker` and the same ``temp_dir``.

    Args:
        head_address: GCS address ``host:port`` of the head (``ClusterInfo.address``).
        temp_dir: Ray temp dir for this node; short (unix socket paths), created with mode 0700.
        num_cpus: Logical CPUs the node advertises (default 1).
        resources: Custom Ray resources of the node, e.g. ``{"node_b": 1}``.
        timeout_s: Seconds to wait for ``ray start`` (default 60).

    Returns:
        Sorted pids of the node's processes right after start.

    Raises:
        SpecError: ``num_cpus < 0``.
        ZeroplaneError: ``ray start`` failed or timed out (the message ends with its output); whatever
            it started is stopped first.
    """
    if num_cpus < 0:
        raise SpecError(f"num_cpus must be >= 0, got {num_cpus}")
    _prepare_temp_dir(temp_dir)
    listen_port, grpc_port = _free_ports(2, set())
    args = [
        f"--address={head_address}",
        f"--num-cpus={num_cpus}",
        f"--temp-dir={temp_dir}",
        f"--dashboard-agent-listen-port={listen_port}",
        f"--dashboard-agent-grpc-port={grpc_port}",
        "--disable-usage-stats",
    ]
    if resources:
        args.append(f"--resources={json.dumps(resources)}")
    try:
        _run_ray_start(args, Path(temp_dir) / "ray-start-worker.log", timeout_s, auth_env())
    except BaseException:
        with contextlib.suppress(Exception):
            stop_local_worker(temp_dir, grace_s=5)
        raise
    return sorted(_collect_head_procs({}, [temp_dir]))


def stop_local_worker(temp_dir: str, grace_s: float = 10) -> List[int]:
    """Stop a node started by :func:`join_local_worker`: every process referencing its ``temp_dir``
    and their descendants (SIGTERM, then SIGKILL after ``grace_s``). Never ``ray stop``.

    Returns:
        Sorted pids that were ended.

    Raises:
        ZeroplaneError: a process survived SIGKILL.
    """
    return sorted(_end_node_procs({}, [temp_dir], [], grace_s))
