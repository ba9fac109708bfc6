"""The local Ray head of ``zeroplane cluster up`` / ``cluster down``: free ports, ``ray start --head`` with
a private temp dir, readiness, the state file record, and stopping exactly what was started.

Rules: ``stop_local_head`` ends only processes zeroplane started (recorded pids, processes referencing
our Ray temp dir or GCS address, and their descendants; see :mod:`zeroplane.cluster.procs`). It never
runs ``ray stop`` and never kills by process name, so another Ray cluster on the machine is left alone.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from zeroplane.errors import SpecError, ZeroplaneError
from zeroplane.names import ENV_BIND_HOST

from .auth import AUTH_TOKEN, _ensure_token_for_new_cluster, auth_headers
from .launcher import _ray_cli
from .procs import (
    _collect_head_procs,
    _core_alive,
    _end_node_procs,
    _path_pattern,
    _proc_meta,
    _procs_referencing,
    _terminate,
)
from .state import (
    DEFAULT_DASHBOARD_PORT,
    DEFAULT_SERVE_PORT,
    ClusterInfo,
    _default_temp_dir,
    _info_from_state,
    _prepare_temp_dir,
    _read_state,
    _state_lock,
    _write_state,
    state_dir,
    state_file,
)

# --------------------------------------------------------------------------------------- bind host

"""Environment variable that picks where a new local head listens when ``start_local_head`` is not told:
``127.0.0.1`` (default) or ``0.0.0.0``."""

BIND_LOOPBACK = "127.0.0.1"
BIND_ALL = "0.0.0.0"


def _bind_host(requested: Optional[str]) -> str:
    """Where a new local head listens: ``requested``, else ``$ZEROPLANE_BIND_HOST`` (empty means unset),
    else 127.0.0.1.

    Raises:
        SpecError: the value is neither ``127.0.0.1`` nor ``0.0.0.0``.
    """
    source = "bind_host"
    if requested is None:
        requested, source = (os.environ.get(ENV_BIND_HOST) or "").strip() or BIND_LOOPBACK, ENV_BIND_HOST
    if requested not in (BIND_LOOPBACK, BIND_ALL):
        raise SpecError(
            f"{source} must be {BIND_LOOPBACK} or {BIND_ALL} (reachable from the network), got {requested!r}"
        )
    return requested


def _bind_args(bind_host: str) -> tuple[list[str], dict[str, str]]:
    """``ray start --head`` arguments and extra environment that make the head listen on ``bind_host``.

    Ray 2.60 has no single listen-address flag: each component binds to loopback only when the node's IP
    is loopback (GCS and raylet gRPC, dashboard agent, runtime-env agent, metrics exporters, Ray Client
    server); otherwise on every interface. ``--node-ip-address=127.0.0.1`` alone is not enough on Linux:
    ``ray start`` replaces a loopback node IP with the machine's address unless Ray clusters are "not
    enabled" (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, what Ray does by default on macOS and Windows:
    the node then stays on 127.0.0.1). Besides, the variable only stops ``ray start`` *without*
    ``--head`` in that environment, and makes the head's own processes (job drivers) take 127.0.0.1 as
    their node IP, which is this node's. Worker nodes joining it (started elsewhere) are unaffected.
    The dashboard has its own ``--dashboard-host``.
    """
    if bind_host == BIND_LOOPBACK:
        args = [f"--node-ip-address={BIND_LOOPBACK}", f"--dashboard-host={BIND_LOOPBACK}"]
        return args, {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    return [f"--dashboard-host={BIND_ALL}"], {}


# --------------------------------------------------------------------------------------- ports


def _port_is_free(port: int) -> bool:
    """True when TCP ``port`` can be bound on 0.0.0.0 and on 127.0.0.1."""
    for host in ("0.0.0.0", "127.0.0.1"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def _free_port(exclude: Optional[set[int]] = None) -> int:
    """A free TCP port not in ``exclude``.

    Raises:
        ZeroplaneError: none found in 100 tries.
    """
    exclude = exclude or set()
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("0.0.0.0", 0))
            port = s.getsockname()[1]
        if port not in exclude and _port_is_free(port):
            return port
    raise ZeroplaneError("could not find a free TCP port")


def _free_ports(n: int, taken: set[int]) -> list[int]:
    """``n`` distinct free TCP ports not in ``taken``; each is added to ``taken``.

    Raises:
        ZeroplaneError: no free port found.
    """
    ports = []
    for _ in range(n):
        ports.append(_free_port(taken))
        taken.add(ports[-1])
    return ports


def _pick_port(requested: Optional[int], preferred: int, what: str, taken: set[int]) -> int:
    """``requested`` if given (must be free), else ``preferred`` if free, else any free port; the
    port is added to ``taken``.

    Raises:
        SpecError: ``requested`` is outside 1-65535.
        ZeroplaneError: ``requested`` is in use.
    """
    if requested is not None:
        if not 1 <= requested <= 65535:
            raise SpecError(f"{what} port must be within 1-65535, got {requested}")
        if requested in taken or not _port_is_free(requested):
            raise ZeroplaneError(f"{what} port {requested} is already in use; pick another")
        port = requested
    elif preferred not in taken and _port_is_free(preferred):
        port = preferred
    else:
        port = _free_port(taken)
    taken.add(port)
    return port


def _tcp_reachable(address: str, timeout_s: float = 2.0) -> bool:
    """True when a TCP connection to ``host:port`` succeeds within ``timeout_s``."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return False
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def _local_cluster_alive(data: Optional[dict[str, Any]]) -> Optional[ClusterInfo]:
    """Return the recorded local cluster (raw state dict ``data``) if its GCS answers and its core
    pids live, else None."""
    info = _info_from_state(data)
    if info is None or data is None:
        return None
    if not _core_alive(data.get("processes") or {}):
        return None
    if not _tcp_reachable(info.address):
        return None
    return info


# --------------------------------------------------------------------------------------- ray start

_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _tail(path: Path, lines: int = 3, max_chars: int = 1500) -> str:
    """One line summarising Ray's output in ``path``: its last error line if it has one,
    else its last ``lines`` non-empty lines (ANSI colours stripped)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no output)"
    kept = [_ANSI_RE.sub("", ln).strip() for ln in text.splitlines()]
    kept = [ln for ln in kept if ln]
    errors = [ln for ln in kept if re.search(r"(Error|Exception)\b|\bERROR\b|\bfailed\b", ln)]
    chosen = errors[-1:] if errors else kept[-lines:]
    return (" | ".join(chosen) or "(no output)")[:max_chars]


def _run_ray_start(args: list[str], log_path: Path, timeout_s: float, env_extra: dict[str, str]) -> None:
    """Run ``ray start ARGS`` (this interpreter's Ray) in a new session, output to ``log_path``.

    ``args[0]`` names the node in a failure message (``--head`` or ``--address=HOST:PORT``).

    The environment is this process's without ``RAY_ADDRESS``, with usage stats off, this
    interpreter's folder first on ``PATH`` (job entrypoints run ``python …`` through the node's PATH)
    and ``env_extra`` on top.

    Raises:
        ZeroplaneError: ``ray start`` exited non-zero or ran past ``timeout_s`` seconds; the message
            ends with the tail of its output.
    """
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # a node started here never joins whatever RAY_ADDRESS names
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(env_extra)
    with open(log_path, "w") as log:
        try:
            rc: Optional[int] = subprocess.run(
                _ray_cli() + ["start", *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C in the user's shell must not hit the node
                timeout=timeout_s,
                check=False,
            ).returncode
        except subprocess.TimeoutExpired:
            rc = None
    if rc != 0:
        why = f"exit code {rc}" if rc is not None else f"timed out after {timeout_s:.3g}s"
        raise ZeroplaneError(f"`ray start {args[0].replace('=', ' ', 1)}` failed ({why}): {_tail(log_path)}")


def _wait_dashboard(url: str, deadline: float, proc_check: Optional[Callable[[], bool]] = None) -> Optional[str]:
    """Poll ``{url}/api/version`` (with auth headers) until it answers 200 or ``deadline``
    (``time.monotonic()`` seconds) passes. Return None when ready, else the last error; stops early on
    HTTP 401/403 or when ``proc_check()`` says the head's processes are gone."""
    import requests

    last_err: Optional[str] = "not answering"
    while time.monotonic() < deadline:
        try:
            resp = requests.get(f"{url}/api/version", headers=auth_headers(url), timeout=3)
            if resp.status_code == 200:
                return None
            last_err = f"HTTP {resp.status_code} from /api/version"
            if resp.status_code in (401, 403):
                return last_err  # will not fix itself
        except requests.RequestException as e:
            last_err = type(e).__name__
        if proc_check is not None and not proc_check():
            return "Ray head processes exited"
        time.sleep(0.5)
    return last_err


# --------------------------------------------------------------------------------------- start / stop


def start_local_head(
    num_cpus: Optional[int] = None,
    dashboard_port: Optional[int] = None,
    serve_http_port: Optional[int] = None,
    timeout_s: float = 120,
    bind_host: Optional[str] = None,
) -> ClusterInfo:
    """Start a single-node Ray head for zeroplane, or return the one already running.

    Runs ``ray start --head`` in a subprocess with a private temp dir
    (``<state_dir>/ray``, or ``/tmp/zeroplane-<uid>-<hash>`` when that path would be too
    long for Ray's unix sockets), free ports, every listening socket (GCS, raylet, dashboard,
    agents, metrics, Ray Client server) on 127.0.0.1 unless ``bind_host`` asks for 0.0.0.0, and
    usage stats disabled. Token authentication is used unless ``RAY_AUTH_MODE`` says otherwise;
    if no token exists one is created at ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``
    (what ``ray.init()`` does too); an existing token file that others can read is tightened to
    0600. Returns once the dashboard's ``/api/version`` answers, after recording the head's pids in
    ``<state_dir>/local-cluster.json``. The result's ``bind_host`` and ``auth`` say how it was
    started (``auth == "disabled"``: anyone who reaches its ports can run code on it).

    Idempotent: if the recorded cluster is alive (GCS reachable, GCS server and raylet pids
    running), it is returned unchanged, provided it listens where asked. A recorded cluster that
    is half-dead is cleaned up (see :func:`stop_local_head`) and a new one started.

    Args:
        num_cpus: Logical CPUs the node advertises. Default ``max(os.cpu_count(), 4)`` so two
            training workers, a driver and a Serve replica fit on a small machine.
        dashboard_port: Dashboard / Jobs API port. Default 8265 if free, else any free port.
        serve_http_port: Port recorded for the Serve HTTP proxy. Default 8000 if free, else
            any free port.
        timeout_s: Seconds to wait for ``ray start`` plus the dashboard (default 120).
        bind_host: Where the head listens: ``"127.0.0.1"`` (this machine only) or ``"0.0.0.0"``
            (every interface, so other machines can reach it: only with token auth on a network you
            trust). Default None: ``$ZEROPLANE_BIND_HOST`` if set, else ``"127.0.0.1"``. A head on
            127.0.0.1 takes no other node, and Ray clients outside it reach it through the dashboard
            URL (Jobs API, state API: what zeroplane uses): on Linux ``ray start --address`` and
            ``ray.init(address=GCS)`` rewrite 127.0.0.1 to the machine's address (a client, not a
            node, can opt out with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``). Ask for 0.0.0.0 to
            add worker nodes.

    Returns:
        The cluster's :class:`ClusterInfo` (``local=True``, ``bind_host`` and ``auth`` set).

    Raises:
        SpecError: an invalid argument (e.g. ``num_cpus < 1``, port out of range, a ``bind_host``
            or ``$ZEROPLANE_BIND_HOST`` other than 127.0.0.1 / 0.0.0.0).
        ZeroplaneError: a requested port is taken; the running head listens elsewhere than
            ``bind_host`` (run ``zeroplane cluster down`` first); the Ray token file is readable by
            others and not ours to tighten; or Ray failed to start or did not become ready within
            ``timeout_s``, the message ending with the tail of Ray's output.
    """
    if num_cpus is not None and num_cpus < 1:
        raise SpecError(f"num_cpus must be >= 1, got {num_cpus}")
    if timeout_s <= 0:
        raise SpecError(f"timeout_s must be > 0, got {timeout_s}")
    host = _bind_host(bind_host)

    with _state_lock():
        data = _read_state()
        existing = _local_cluster_alive(data)
        if existing is not None:
            err = _wait_dashboard(existing.dashboard_url, time.monotonic() + min(timeout_s, 30))
            if err is None:
                if existing.bind_host != host:
                    # Never hand out a head that listens more widely (or differently) than asked.
                    # A record without bind_host predates loopback binding: that head listens everywhere.
                    where = existing.bind_host or "every interface"
                    raise ZeroplaneError(
                        f"the running local Ray head listens on {where}, not {host}; "
                        "run `zeroplane cluster down` first, then start it again"
                    )
                return existing
        if data is not None:
            _stop_locked(grace_s=10)  # stale or half-dead: clean up before starting anew
        return _start_locked(num_cpus, dashboard_port, serve_http_port, timeout_s, host)


def _start_locked(
    num_cpus: Optional[int],
    dashboard_port: Optional[int],
    serve_http_port: Optional[int],
    timeout_s: float,
    bind_host: str,
) -> ClusterInfo:
    deadline = time.monotonic() + timeout_s
    sdir = state_dir()
    taken: set[int] = set()
    dash_port = _pick_port(dashboard_port, DEFAULT_DASHBOARD_PORT, "dashboard", taken)
    serve_port = _pick_port(serve_http_port, DEFAULT_SERVE_PORT, "Serve HTTP", taken)

    temp_dir = _default_temp_dir(sdir)
    _prepare_temp_dir(temp_dir)
    # Leftovers of a crashed start that left no state file.
    leftovers = _collect_head_procs({}, [temp_dir])
    if leftovers:
        _terminate(leftovers, grace_s=10)

    gcs_port, agent_port, client_port = _free_ports(3, taken)
    cpus = num_cpus if num_cpus is not None else max(os.cpu_count() or 1, 4)
    auth_mode = _ensure_token_for_new_cluster()
    bind_args, bind_env = _bind_args(bind_host)
    args = [
        "--head",
        f"--port={gcs_port}",
        *bind_args,
        f"--dashboard-port={dash_port}",
        "--include-dashboard=true",
        f"--dashboard-agent-listen-port={agent_port}",
        f"--ray-client-server-port={client_port}",
        f"--num-cpus={cpus}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    # Remove a stale address file so we never read a previous session's address.
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(temp_dir, "ray_current_cluster"))

    log_path = sdir / "ray-start.log"
    started_at = time.time()
    try:
        env_extra = {**bind_env, **({"RAY_AUTH_MODE": AUTH_TOKEN} if auth_mode == AUTH_TOKEN else {})}
        _run_ray_start(args, log_path, max(deadline - time.monotonic(), 1), env_extra)
        address = _read_head_address(temp_dir, gcs_port)
        info = ClusterInfo(
            address=address,
            dashboard_url=f"http://127.0.0.1:{dash_port}",
            serve_http_port=serve_port,
            local=True,
            temp_dir=temp_dir,
            pids=[],
            started_at=started_at,
            bind_host=bind_host,
            auth=auth_mode,
        )
        # Record right away so that `stop` finds this head even if we die below.
        _record(info, _collect_head_procs({}, [temp_dir], [address]))

        def head_running() -> bool:
            return bool(_procs_referencing(_path_pattern([temp_dir])))

        err = _wait_dashboard(info.dashboard_url, deadline, head_running)
        if err is not None:
            raise ZeroplaneError(
                f"Ray dashboard at {info.dashboard_url} not ready ({err}); "
                f"logs in {temp_dir}/session_latest/logs; ray start said: {_tail(log_path)}"
            )
        return _record(info, _collect_head_procs({}, [temp_dir], [address]))
    except BaseException:
        # Clean up whatever this attempt started (only our temp dir / GCS address).
        addresses = [_read_head_address(temp_dir, gcs_port)]
        with contextlib.suppress(Exception):
            _terminate(_collect_head_procs({}, [temp_dir], addresses), grace_s=5)
        with contextlib.suppress(OSError):
            state_file().unlink()
        raise


def _record(info: ClusterInfo, procs: dict[int, Any]) -> ClusterInfo:
    """Store ``info`` with the pids (and their start times) of ``procs`` in the state file."""
    meta = _proc_meta(procs)
    info.pids = sorted(int(p) for p in meta)
    state = info.to_dict()
    state["processes"] = meta
    _write_state(state)
    return info


def _read_head_address(temp_dir: str, gcs_port: int) -> str:
    """The head's GCS address ``host:port``: what Ray wrote to ``<temp_dir>/ray_current_cluster`` when it
    names ``gcs_port``, else this node's IP (or 127.0.0.1) with ``gcs_port``."""
    try:
        text = Path(temp_dir, "ray_current_cluster").read_text().strip()
    except OSError:
        text = ""
    if text and text.rsplit(":", 1)[-1] == str(gcs_port):
        return text
    try:
        from ray._private.services import get_node_ip_address

        host = get_node_ip_address()
    except Exception:
        host = "127.0.0.1"
    return f"{host}:{gcs_port}"


def stop_local_head(grace_s: float = 10) -> list[int]:
    """Stop the local Ray head zeroplane started, and only that.

    Ends the pids recorded at start (when their start time still matches), every live
    process whose command line references our Ray temp dir, and all descendants of those
    (workers, job drivers, Serve replicas), re-scanning until none is left. Each gets
    SIGTERM, then SIGKILL after ``grace_s``. Never runs ``ray stop`` and never matches by
    process name. Removes the state file.

    Args:
        grace_s: Seconds to wait after SIGTERM before SIGKILL (default 10).

    Returns:
        Sorted pids that were ended; ``[]`` if nothing was running.

    Raises:
        ZeroplaneError: a process survived SIGKILL.
    """
    with _state_lock():
        return _stop_locked(grace_s)


def _stop_locked(grace_s: float) -> list[int]:
    data = _read_state() or {}
    temp_dirs = [_default_temp_dir(state_dir())]
    recorded_temp = data.get("temp_dir")
    if isinstance(recorded_temp, str) and recorded_temp:
        temp_dirs.append(recorded_temp)
    proc_meta = data.get("processes") or {}
    addresses = [data["address"]] if isinstance(data.get("address"), str) else []

    ended = _end_node_procs(proc_meta, temp_dirs, addresses, grace_s)
    with contextlib.suppress(FileNotFoundError):
        state_file().unlink()
    return sorted(ended)
