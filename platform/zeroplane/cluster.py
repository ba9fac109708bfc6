"""Local Ray cluster lifecycle and cluster discovery.

This module starts and stops the single-node Ray head that ``zeroplane cluster up`` /
``cluster down`` manage, finds the cluster other commands should talk to, and supplies
the authentication settings a client needs for a token-auth cluster (Ray 2.60 enables
token authentication by default).

Design rules:

* ``ray`` is never imported at module level (the CLI must start fast); functions import it
  lazily where needed.
* ``stop_local_head`` only ends processes zeroplane started: the pids recorded at start
  (checked against their recorded start time, so a reused pid is never hit), live processes
  whose command line references our private Ray temp dir, and their descendants. It never
  runs ``ray stop`` and never kills by process name, so another Ray cluster on the same
  machine is left alone.
* The token value is never printed, logged or put into an error message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

from zeroplane.errors import SpecError, ZeroplaneError

STATE_FILE_NAME = "local-cluster.json"
"""Name of the local cluster state file inside :func:`state_dir`."""

DEFAULT_DASHBOARD_PORT = 8265
DEFAULT_GCS_PORT = 6379
DEFAULT_SERVE_PORT = 8000

# Ray puts unix sockets at <temp>/session_<YYYY-mm-dd_HH-MM-SS_ffffff>_<pid>/sockets/<name>
# and AF_UNIX paths must stay under 108 bytes (107 usable). The session part plus the longest
# socket name take about 68 characters, so keep the temp dir itself short.
_MAX_TEMP_DIR_LEN = 36

# Processes whose death means the head is gone (their names as psutil reports them).
_CORE_PROCESS_NAMES = ("gcs_server", "raylet")

_NO_CLUSTER_MESSAGE = (
    "no Ray cluster: run `zeroplane cluster up` or pass --address / set RAY_ADDRESS"
)


@dataclass
class ClusterInfo:
    """Where a Ray cluster lives and how zeroplane reaches it.

    Attributes:
        address: GCS address ``host:port`` (what ``ray.init(address=...)`` takes).
        dashboard_url: Dashboard / Jobs API base URL ``http://host:port`` (no trailing slash).
        serve_http_port: TCP port the Ray Serve HTTP proxy listens on (started by whoever
            deploys; this module only picks and records it).
        local: True when zeroplane started this cluster on this machine.
        temp_dir: Ray ``--temp-dir`` of a local cluster (logs, sockets), else None.
        pids: Pids of the head's processes recorded right after start (local only).
        started_at: Start time as Unix seconds (local only), else None.
    """

    address: str
    dashboard_url: str
    serve_http_port: int
    local: bool = False
    temp_dir: str | None = None
    pids: list[int] = field(default_factory=list)
    started_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict of all fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterInfo:
        """Build a ClusterInfo from :meth:`to_dict` output; unknown keys are ignored.

        Raises:
            ValueError: a required key (``address``, ``dashboard_url``, ``serve_http_port``)
                is missing or has the wrong type.
        """
        try:
            return cls(
                address=str(data["address"]),
                dashboard_url=str(data["dashboard_url"]).rstrip("/"),
                serve_http_port=int(data["serve_http_port"]),
                local=bool(data.get("local", False)),
                temp_dir=data.get("temp_dir") or None,
                pids=[int(p) for p in data.get("pids") or []],
                started_at=(
                    float(data["started_at"]) if data.get("started_at") is not None else None
                ),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"invalid cluster info: {e!r}") from e


# --------------------------------------------------------------------------------------
# State directory and state file
# --------------------------------------------------------------------------------------


def state_dir() -> Path:
    """Return zeroplane's state directory, creating it if needed.

    Returns:
        ``$ZEROPLANE_HOME`` if set and non-empty, else ``~/.zeroplane``.
    """
    raw = os.environ.get("ZEROPLANE_HOME") or "~/.zeroplane"
    path = Path(raw).expanduser().absolute()
    path.mkdir(parents=True, exist_ok=True)
    return path


def state_file() -> Path:
    """Return the path of the local cluster state file (``<state_dir>/local-cluster.json``)."""
    return state_dir() / STATE_FILE_NAME


def _default_temp_dir(sdir: Path) -> str:
    """Pick the Ray temp dir for the state dir ``sdir``: ``<sdir>/ray`` if short enough.

    Otherwise ``/tmp/zeroplane-<uid>-<hash of sdir>`` (deterministic, so a later
    ``stop`` finds leftovers even without a state file).
    """
    preferred = str(sdir / "ray")
    # Never share Ray's default temp dir (e.g. ZEROPLANE_HOME=/tmp): processes of other
    # Ray clusters reference it, and stop_local_head ends whatever references our temp dir.
    ray_defaults = {
        os.path.realpath(os.path.join(base, "ray"))
        for base in ("/tmp", tempfile.gettempdir(), os.environ.get("RAY_TMPDIR") or "/tmp")
    }
    if len(preferred) <= _MAX_TEMP_DIR_LEN and os.path.realpath(preferred) not in ray_defaults:
        return preferred
    digest = hashlib.sha256(str(sdir).encode()).hexdigest()[:10]
    base = "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()
    return os.path.join(base, f"zeroplane-{os.getuid()}-{digest}")


def _prepare_temp_dir(path: str) -> None:
    if len(path) > _MAX_TEMP_DIR_LEN + 8:
        raise ZeroplaneError(
            f"Ray temp dir {path!r} is too long for unix socket paths; "
            "set ZEROPLANE_HOME to a shorter path"
        )
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if st.st_uid != os.getuid():
        raise ZeroplaneError(
            f"Ray temp dir {path} belongs to another user (uid {st.st_uid}); "
            "set ZEROPLANE_HOME to a directory of your own"
        )


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read_state() -> dict[str, Any] | None:
    """Return the raw state dict, or None if there is no (readable) state file."""
    path = state_file()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _info_from_state(data: dict[str, Any] | None) -> ClusterInfo | None:
    if not data:
        return None
    try:
        return ClusterInfo.from_dict(data)
    except ValueError:
        return None


@contextlib.contextmanager
def _state_lock() -> Iterator[None]:
    """Serialise start/stop of the local cluster across processes (advisory flock)."""
    lock_path = state_dir() / "local-cluster.lock"
    with open(lock_path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------
# Authentication
# --------------------------------------------------------------------------------------


def _default_token_path() -> Path:
    return Path.home() / ".ray" / "auth_token"


def _read_token() -> str | None:
    """Return the Ray auth token from the same sources Ray uses, or None.

    Order: ``RAY_AUTH_TOKEN``, the file named by ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``.
    """
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path_env = os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    paths = [Path(path_env).expanduser()] if path_env else [_default_token_path()]
    for p in paths:
        try:
            token = p.read_text().strip()
        except OSError:
            continue
        if token:
            return token
    return None


def _auth_mode_env() -> str | None:
    value = os.environ.get("RAY_AUTH_MODE")
    return value.strip().lower() if value is not None else None


def auth_env() -> dict[str, str]:
    """Return the environment variables a Ray client needs for a token-auth cluster.

    Ray clients (``ray.init(address=...)``, ``JobSubmissionClient``, the ``ray`` CLI) only
    send the token when ``RAY_AUTH_MODE=token``. If ``RAY_AUTH_MODE`` is unset and a token is
    available (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``), this
    returns ``{"RAY_AUTH_MODE": "token"}``; otherwise ``{}`` (an explicit ``RAY_AUTH_MODE`` is
    respected). The token value itself is never included.

    Returns:
        Variables to add to a client's environment (possibly empty).
    """
    if _auth_mode_env() is None and _read_token() is not None:
        return {"RAY_AUTH_MODE": "token"}
    return {}


def apply_auth_env() -> dict[str, str]:
    """Set :func:`auth_env` variables in ``os.environ`` for this process and its children.

    If Ray's native module is already loaded in this process, its cached configuration and
    token are refreshed so that in-process clients (e.g. ``JobSubmissionClient``) see the
    new mode.

    Returns:
        The variables that were set (possibly empty).
    """
    env = auth_env()
    os.environ.update(env)
    if env or _auth_mode_env() == "token":
        _refresh_ray_auth_cache()
    return env


def _refresh_ray_auth_cache() -> None:
    if "ray._raylet" not in sys.modules:
        return  # Ray reads the environment when it is first loaded.
    with contextlib.suppress(Exception):
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def auth_headers() -> dict[str, str]:
    """Return HTTP headers for plain requests to the dashboard of a token-auth cluster.

    A dashboard without token auth ignores the header, so it is sent whenever a token is
    available (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``).

    Returns:
        ``{"Authorization": "Bearer <token>"}`` when a token is available, else ``{}``.
        Never print or log the result.
    """
    token = _read_token()
    if token is None:
        return {}
    return {"Authorization": f"Bearer {token}"}


def _ensure_token_for_new_cluster() -> bool:
    """Decide whether the new head uses token auth and make sure a token exists.

    Mirrors what ``ray.init()`` does for a new local cluster: token auth is on unless
    ``RAY_AUTH_MODE`` says otherwise, and a token is generated (mode 0600) if none exists.

    Returns:
        True if the head should start with ``RAY_AUTH_MODE=token``.
    """
    mode = _auth_mode_env()
    if mode is not None and mode != "token":
        return False
    if _read_token() is not None:
        return True
    path_env = os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    path = Path(path_env).expanduser() if path_env else _default_token_path()
    try:
        from ray._private.authentication.authentication_token_generator import (
            generate_new_authentication_token,
        )

        token = generate_new_authentication_token()
    except Exception:  # pragma: no cover - older/newer Ray layouts
        import secrets

        token = secrets.token_hex(32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return True  # Someone else just created it.
    except OSError as e:
        raise ZeroplaneError(f"cannot create Ray auth token file {path}: {e.strerror}") from e
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return True


# --------------------------------------------------------------------------------------
# Ports and HTTP helpers
# --------------------------------------------------------------------------------------


def _port_is_free(port: int) -> bool:
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET, "127.0.0.1")):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def _free_port(exclude: set[int] | None = None) -> int:
    exclude = exclude or set()
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("0.0.0.0", 0))
            port = s.getsockname()[1]
        if port not in exclude and _port_is_free(port):
            return port
    raise ZeroplaneError("could not find a free TCP port")


def _pick_port(requested: int | None, preferred: int, what: str, taken: set[int]) -> int:
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
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return False
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def _http_get_json(url: str, timeout_s: float = 5.0) -> Any:
    """GET ``url`` with auth headers and return parsed JSON.

    Raises:
        OSError / ValueError / requests exceptions: on connection, HTTP or JSON errors.
    """
    import requests

    resp = requests.get(url, headers=auth_headers(), timeout=timeout_s)
    if resp.status_code in (401, 403):
        raise PermissionError(
            f"dashboard refused the request (HTTP {resp.status_code}): the cluster uses token "
            "authentication; set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or put the token in "
            "~/.ray/auth_token"
        )
    resp.raise_for_status()
    return resp.json()


# --------------------------------------------------------------------------------------
# Process discovery
# --------------------------------------------------------------------------------------


def _path_pattern(paths: list[str], addresses: list[str] | None = None) -> re.Pattern[str] | None:
    """Regex for a command-line argument that references one of our paths or addresses.

    A path matches only as a whole path (``/x/ray`` matches ``--temp-dir=/x/ray`` and
    ``/x/ray/session_1/logs`` but not ``/x/ray2``); a GCS ``host:port`` only as a whole
    address (not ``host:63790``).
    """
    variants = {v for p in paths if p for v in (p.rstrip("/"), os.path.realpath(p))}
    variants -= {"", "/"}
    alternatives = []
    if variants:
        joined = "|".join(re.escape(v) for v in sorted(variants, key=len, reverse=True))
        alternatives.append(rf"(?<![\w.\-])(?:{joined})(?=$|[/\s'\",;:=)\]])")
    for addr in addresses or []:
        host, _, port = addr.rpartition(":")
        if host and port.isdigit():
            alternatives.append(rf"(?<![\w.\-]){re.escape(addr)}(?!\d)")
    return re.compile("|".join(alternatives)) if alternatives else None


def _protected_pids() -> set[int]:
    """This process and its ancestors: never signal them."""
    import psutil

    pids = {os.getpid()}
    with contextlib.suppress(psutil.Error):
        pids.update(p.pid for p in psutil.Process().parents())
    return pids


def _is_gone(proc: Any) -> bool:
    import psutil

    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def _procs_referencing(pattern: re.Pattern[str] | None) -> list[Any]:
    """Live processes of this user whose command line references the temp dir pattern."""
    import psutil

    if pattern is None:
        return []
    uid = os.getuid()
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "uids"]):
        try:
            uids = proc.info.get("uids")
            if uids is not None and uid != 0 and uids.real != uid:
                continue
            cmdline = proc.info.get("cmdline") or []
            if any(pattern.search(arg) for arg in cmdline):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _recorded_procs(proc_meta: dict[str, Any]) -> list[Any]:
    """Recorded processes still running with the same start time (pid-reuse safe)."""
    import psutil

    procs = []
    for pid_s, meta in (proc_meta or {}).items():
        try:
            proc = psutil.Process(int(pid_s))
            created = float(meta.get("create_time"))
            if abs(proc.create_time() - created) > 0.5:
                continue  # pid reused by an unrelated process
            if not _is_gone(proc):
                procs.append(proc)
        except (psutil.Error, ValueError, TypeError, AttributeError):
            continue
    return procs


def _with_descendants(procs: list[Any]) -> dict[int, Any]:
    import psutil

    out: dict[int, Any] = {}
    for proc in procs:
        out[proc.pid] = proc
        try:
            for child in proc.children(recursive=True):
                out.setdefault(child.pid, child)
        except psutil.Error:
            continue
    return out


def _collect_head_procs(
    proc_meta: dict[str, Any], temp_dirs: list[str], addresses: list[str] | None = None
) -> dict[int, Any]:
    """Recorded procs + procs referencing our temp dir(s) or GCS address + descendants.

    The GCS address catches the Ray Client server, whose command line names the GCS
    address but not the temp dir.
    """
    pattern = _path_pattern(temp_dirs, addresses)
    procs = _recorded_procs(proc_meta) + _procs_referencing(pattern)
    found = _with_descendants(procs)
    for pid in _protected_pids():
        found.pop(pid, None)
    return {pid: p for pid, p in found.items() if not _is_gone(p)}


def _proc_meta(procs: dict[int, Any]) -> dict[str, dict[str, Any]]:
    import psutil

    meta: dict[str, dict[str, Any]] = {}
    for pid, proc in sorted(procs.items()):
        try:
            meta[str(pid)] = {"create_time": proc.create_time(), "name": proc.name()}
        except psutil.Error:
            continue
    return meta


def _core_alive(proc_meta: dict[str, Any]) -> bool:
    """True if every recorded core process (GCS server, raylet) is still running."""
    core = {
        pid: meta
        for pid, meta in (proc_meta or {}).items()
        if isinstance(meta, dict) and meta.get("name") in _CORE_PROCESS_NAMES
    }
    if not core:
        return False
    return len(_recorded_procs(core)) == len(core)


def _local_cluster_alive(data: dict[str, Any] | None) -> ClusterInfo | None:
    """Return the recorded local cluster if its GCS answers and its core pids live."""
    info = _info_from_state(data)
    if info is None or data is None:
        return None
    if not _core_alive(data.get("processes") or {}):
        return None
    if not _tcp_reachable(info.address):
        return None
    return info


# --------------------------------------------------------------------------------------
# Start / stop
# --------------------------------------------------------------------------------------


def _ray_start_command() -> list[str]:
    # The interpreter running zeroplane, so the head uses the same Ray installation.
    return [sys.executable, "-m", "ray.scripts.scripts"]


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


def _wait_dashboard(url: str, deadline: float, proc_check: Any = None) -> str | None:
    """Poll ``{url}/api/version`` until it answers 200. Return None or the last error."""
    import requests

    last_err: str | None = "not answering"
    while time.monotonic() < deadline:
        try:
            resp = requests.get(f"{url}/api/version", headers=auth_headers(), timeout=3)
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


def start_local_head(
    num_cpus: int | None = None,
    dashboard_port: int | None = None,
    serve_http_port: int | None = None,
    timeout_s: float = 120,
) -> ClusterInfo:
    """Start a single-node Ray head for zeroplane, or return the one already running.

    Runs ``ray start --head`` in a subprocess with a private temp dir
    (``<state_dir>/ray``, or ``/tmp/zeroplane-<uid>-<hash>`` when that path would be too
    long for Ray's unix sockets), free ports, the dashboard bound to 127.0.0.1, and usage
    stats disabled. Token authentication is used unless ``RAY_AUTH_MODE`` says otherwise;
    if no token exists one is created at ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``
    (what ``ray.init()`` does too). Returns once the dashboard's ``/api/version`` answers,
    after recording the head's pids in ``<state_dir>/local-cluster.json``.

    Idempotent: if the recorded cluster is alive (GCS reachable, GCS server and raylet pids
    running), it is returned unchanged. A recorded cluster that is half-dead is cleaned up
    (see :func:`stop_local_head`) and a new one started.

    Args:
        num_cpus: Logical CPUs the node advertises. Default ``max(os.cpu_count(), 4)`` so two
            training workers, a driver and a Serve replica fit on a small machine.
        dashboard_port: Dashboard / Jobs API port. Default 8265 if free, else any free port.
        serve_http_port: Port recorded for the Serve HTTP proxy. Default 8000 if free, else
            any free port.
        timeout_s: Seconds to wait for ``ray start`` plus the dashboard (default 120).

    Returns:
        The cluster's :class:`ClusterInfo` (``local=True``).

    Raises:
        SpecError: an invalid argument (e.g. ``num_cpus < 1``, port out of range).
        ZeroplaneError: a requested port is taken, or Ray failed to start or did not become
            ready within ``timeout_s``; the message ends with the tail of Ray's output.
    """
    if num_cpus is not None and num_cpus < 1:
        raise SpecError(f"num_cpus must be >= 1, got {num_cpus}")
    if timeout_s <= 0:
        raise SpecError(f"timeout_s must be > 0, got {timeout_s}")

    with _state_lock():
        data = _read_state()
        existing = _local_cluster_alive(data)
        if existing is not None:
            err = _wait_dashboard(existing.dashboard_url, time.monotonic() + min(timeout_s, 30))
            if err is None:
                return existing
        if data is not None:
            _stop_locked(grace_s=10)  # stale or half-dead: clean up before starting anew
        return _start_locked(num_cpus, dashboard_port, serve_http_port, timeout_s)


def _start_locked(
    num_cpus: int | None,
    dashboard_port: int | None,
    serve_http_port: int | None,
    timeout_s: float,
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

    gcs_port = _free_port(taken)
    taken.add(gcs_port)
    agent_port = _free_port(taken)
    taken.add(agent_port)
    client_port = _free_port(taken)
    taken.add(client_port)
    cpus = num_cpus if num_cpus is not None else max(os.cpu_count() or 1, 4)

    use_token = _ensure_token_for_new_cluster()
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # a head never joins another cluster
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Job entrypoints run `python …` through the head's PATH: make that this interpreter (the venv
    # zeroplane is installed in), whether or not the venv was activated.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    if use_token:
        env["RAY_AUTH_MODE"] = "token"

    cmd = _ray_start_command() + [
        "start",
        "--head",
        f"--port={gcs_port}",
        "--dashboard-host=127.0.0.1",
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
    rc: int | None = None
    try:
        with open(log_path, "w") as log:
            try:
                rc = subprocess.run(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,  # Ctrl-C in the user's shell must not hit the head
                    timeout=max(deadline - time.monotonic(), 1),
                    check=False,
                ).returncode
            except subprocess.TimeoutExpired:
                rc = None
        if rc != 0:
            why = f"exit code {rc}" if rc is not None else f"timed out after {timeout_s:g}s"
            raise ZeroplaneError(f"`ray start --head` failed ({why}): {_tail(log_path)}")

        address = _read_head_address(temp_dir, gcs_port)
        info = ClusterInfo(
            address=address,
            dashboard_url=f"http://127.0.0.1:{dash_port}",
            serve_http_port=serve_port,
            local=True,
            temp_dir=temp_dir,
            pids=[],
            started_at=started_at,
        )
        # Record right away so that `stop` finds this head even if we die below.
        _record(info, _collect_head_procs({}, [temp_dir], [address]), use_token)

        def head_running() -> bool:
            return bool(_procs_referencing(_path_pattern([temp_dir])))

        err = _wait_dashboard(info.dashboard_url, deadline, head_running)
        if err is not None:
            raise ZeroplaneError(
                f"Ray dashboard at {info.dashboard_url} not ready ({err}); "
                f"logs in {temp_dir}/session_latest/logs; ray start said: {_tail(log_path)}"
            )
        return _record(info, _collect_head_procs({}, [temp_dir], [address]), use_token)
    except BaseException:
        # Clean up whatever this attempt started (only our temp dir / GCS address).
        addresses = [_read_head_address(temp_dir, gcs_port)]
        with contextlib.suppress(Exception):
            _terminate(_collect_head_procs({}, [temp_dir], addresses), grace_s=5)
        with contextlib.suppress(OSError):
            state_file().unlink()
        raise


def _record(info: ClusterInfo, procs: dict[int, Any], use_token: bool) -> ClusterInfo:
    """Store ``info`` with the pids (and their start times) of ``procs`` in the state file."""
    meta = _proc_meta(procs)
    info.pids = sorted(int(p) for p in meta)
    state = info.to_dict()
    state["processes"] = meta
    state["auth_mode"] = "token" if use_token else "disabled"
    _write_json_atomic(state_file(), state)
    return info


def _read_head_address(temp_dir: str, gcs_port: int) -> str:
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


def _signal(proc: Any, sig: int) -> None:
    import psutil

    with contextlib.suppress(psutil.Error, OSError):
        proc.send_signal(sig)


def _wait_gone(procs: list[Any], timeout_s: float) -> list[Any]:
    """Wait until ``procs`` exit (zombies count as gone); return the survivors."""
    deadline = time.monotonic() + timeout_s
    alive = [p for p in procs if not _is_gone(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if not _is_gone(p)]
    return alive


def _proc_name(proc: Any) -> str:
    import psutil

    try:
        return proc.name()
    except psutil.Error:
        return ""


def _terminate(procs: dict[int, Any], grace_s: float) -> set[int]:
    """Stop ``procs``; return the pids handled.

    Same order as ``ray stop``: the raylet first (its workers and agents fate-share with it),
    then everything else, then the GCS server last. Each group gets SIGTERM, up to a third of
    ``grace_s`` to exit, then SIGKILL.

    Raises:
        ZeroplaneError: a process survived SIGKILL.
    """
    if not procs:
        return set()
    groups: list[list[Any]] = [[], [], []]
    for proc in procs.values():
        name = _proc_name(proc)
        groups[0 if name == "raylet" else 2 if name == "gcs_server" else 1].append(proc)
    for group in groups:
        if not group:
            continue
        for proc in group:
            _signal(proc, signal.SIGTERM)
        survivors = _wait_gone(group, grace_s / 3)
        for proc in survivors:
            _signal(proc, signal.SIGKILL)
        stubborn = _wait_gone(survivors, 10)
        if stubborn:
            pids = ", ".join(str(p.pid) for p in stubborn)
            raise ZeroplaneError(f"Ray processes {pids} survived SIGKILL; check them by hand")
    return set(procs)


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


def _end_node_procs(
    proc_meta: dict[str, Any], temp_dirs: list[str], addresses: list[str], grace_s: float
) -> set[int]:
    """End recorded pids, processes referencing ``temp_dirs``/``addresses``, and descendants."""
    ended: set[int] = set()
    for _ in range(5):  # new workers may spawn while the raylet dies: re-scan
        procs = _collect_head_procs(proc_meta, temp_dirs, addresses)
        procs = {pid: p for pid, p in procs.items() if pid not in ended or not _is_gone(p)}
        if not procs:
            break
        ended |= _terminate(procs, grace_s)
    return ended


def join_local_worker(
    head_address: str,
    temp_dir: str,
    num_cpus: int = 1,
    resources: dict[str, float] | None = None,
    timeout_s: float = 60,
) -> list[int]:
    """Start a second Ray node on this machine that joins the cluster at ``head_address``.

    For trying multi-node behaviour on one machine (two raylets, one GCS): ``ray start --address``
    with its own ``temp_dir`` (logs, sockets), free ports, and the same token authentication as the
    head (``RAY_AUTH_MODE=token`` when a token is available). Stop it with :func:`stop_local_worker`
    and the same ``temp_dir``; nothing else on the machine is touched.

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
        ZeroplaneError: ``ray start`` failed or timed out (the message ends with its output).
    """
    if num_cpus < 0:
        raise SpecError(f"num_cpus must be >= 0, got {num_cpus}")
    _prepare_temp_dir(temp_dir)
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(auth_env())
    taken: set[int] = set()
    ports = []
    for _ in range(2):
        ports.append(_free_port(taken))
        taken.add(ports[-1])
    cmd = _ray_start_command() + [
        "start",
        f"--address={head_address}",
        f"--num-cpus={num_cpus}",
        f"--temp-dir={temp_dir}",
        f"--dashboard-agent-listen-port={ports[0]}",
        f"--dashboard-agent-grpc-port={ports[1]}",
        "--disable-usage-stats",
    ]
    if resources:
        cmd.append(f"--resources={json.dumps(resources)}")
    log_path = Path(temp_dir) / "ray-start-worker.log"
    try:
        with open(log_path, "w") as log:
            rc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, timeout=timeout_s, check=False).returncode
    except subprocess.TimeoutExpired:
        rc = None
    if rc != 0:
        with contextlib.suppress(Exception):
            stop_local_worker(temp_dir, grace_s=5)
        why = f"exit code {rc}" if rc is not None else f"timed out after {timeout_s:g}s"
        raise ZeroplaneError(f"`ray start --address {head_address}` failed ({why}): {_tail(log_path)}")
    return sorted(_collect_head_procs({}, [temp_dir]))


def stop_local_worker(temp_dir: str, grace_s: float = 10) -> list[int]:
    """Stop a node started by :func:`join_local_worker`: every process referencing its ``temp_dir``
    and their descendants (SIGTERM, then SIGKILL after ``grace_s``). Never ``ray stop``.

    Returns:
        Sorted pids that were ended.

    Raises:
        ZeroplaneError: a process survived SIGKILL.
    """
    return sorted(_end_node_procs({}, [temp_dir], [], grace_s))


# --------------------------------------------------------------------------------------
# Discovery and status
# --------------------------------------------------------------------------------------


def _serve_port_env() -> int:
    raw = os.environ.get("ZEROPLANE_SERVE_PORT", "").strip()
    if not raw:
        return DEFAULT_SERVE_PORT
    try:
        port = int(raw)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise SpecError(f"ZEROPLANE_SERVE_PORT must be a port number 1-65535, got {raw!r}")
    return port


def _parse_address(address: str, source: str) -> ClusterInfo:
    addr = address.strip()
    if addr.startswith("ray://"):
        raise SpecError(
            f"{source} {addr!r} is a Ray Client address; zeroplane uses the Jobs API and "
            "needs the dashboard URL, e.g. http://HOST:8265"
        )
    if addr.startswith(("http://", "https://")):
        url = urlparse(addr)
        if not url.hostname:
            raise SpecError(f"{source} {addr!r} has no host; expected http://HOST:PORT")
        dashboard_url = f"{url.scheme}://{url.netloc}".rstrip("/")
        gcs_address = f"{_format_host(url.hostname)}:{DEFAULT_GCS_PORT}"
        return ClusterInfo(gcs_address, dashboard_url, _serve_port_env(), local=False)
    if "://" in addr:
        raise SpecError(
            f"{source} {addr!r} has an unsupported scheme; use http://HOST:PORT (dashboard) "
            "or HOST:PORT (GCS)"
        )
    host, sep, port = addr.rpartition(":")
    if not sep or "]" in port:  # bare host (or bare IPv6 in brackets)
        host, port = addr, str(DEFAULT_GCS_PORT)
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise SpecError(
            f"{source} {addr!r} is not a valid address; use http://HOST:PORT (dashboard) "
            "or HOST:PORT (GCS)"
        )
    host = host.strip("[]")
    dashboard_url = f"http://{_format_host(host)}:{DEFAULT_DASHBOARD_PORT}"
    return ClusterInfo(
        f"{_format_host(host)}:{int(port)}", dashboard_url, _serve_port_env(), local=False
    )


def _format_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _same_endpoint(a: str, b: str) -> bool:
    def norm(s: str) -> tuple[str, str]:
        s = s.strip().rstrip("/")
        if "://" in s:
            u = urlparse(s)
            host, port = u.hostname or "", str(u.port or "")
        else:
            host, _, port = s.rpartition(":")
        host = host.strip("[]").lower()
        if host in ("localhost", "127.0.0.1", "::1"):
            host = "127.0.0.1"
        return host, port

    return norm(a) == norm(b)


CONFIG_FILE_NAME = "config.yaml"
"""Name of the profiles file inside :func:`state_dir` (``~/.zeroplane/config.yaml``)."""

_PROFILE_KEYS = {"address", "auth_token_file", "storage"}


def load_profile(name: str | None = None) -> dict[str, Any] | None:
    """Return a named cluster profile from ``<state_dir>/config.yaml``.

    The file looks like ``profiles: {gpu: {address: http://10.0.0.10:8265, auth_token_file:
    ~/.ray/gpu_token, storage: s3://bucket/zp}}``; only ``address`` is required.

    Args:
        name: Profile name; default ``$ZEROPLANE_PROFILE``. None/empty selects no profile.

    Returns:
        The profile mapping, or None when no profile is selected.

    Raises:
        SpecError: a profile is selected but the file is missing or invalid, the profile does not
            exist, lacks ``address`` or has an unknown key.
    """
    import yaml

    name = name or os.environ.get("ZEROPLANE_PROFILE") or None
    if not name:
        return None
    path = state_dir() / CONFIG_FILE_NAME
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(
            f"profile {name!r} is selected but {path} does not exist; create it with "
            f"`profiles: {{{name}: {{address: http://HOST:8265}}}}` or unset ZEROPLANE_PROFILE"
        ) from None
    except (OSError, yaml.YAMLError) as e:
        raise SpecError(f"{path}: cannot read profiles: {str(e).splitlines()[0]}") from None
    profiles = data.get("profiles") if isinstance(data, dict) else None
    if not isinstance(profiles, dict) or name not in profiles:
        known = ", ".join(sorted(profiles)) if isinstance(profiles, dict) and profiles else "none"
        raise SpecError(f"profile {name!r} is not in {path} (profiles: {known})")
    prof = profiles[name]
    if not isinstance(prof, dict) or not isinstance(prof.get("address"), str) or not prof["address"].strip():
        raise SpecError(f"{path}: profiles.{name}.address is missing; add e.g. address: http://HOST:8265")
    unknown = sorted(set(prof) - _PROFILE_KEYS)
    if unknown:
        raise SpecError(
            f"{path}: profiles.{name}.{unknown[0]} is not a profile key; use {', '.join(sorted(_PROFILE_KEYS))}"
        )
    return dict(prof)


def resolve_cluster(address: str | None = None, profile: str | None = None) -> ClusterInfo:
    """Find the Ray cluster to use.

    Order: the ``address`` argument, env ``RAY_ADDRESS`` (``auto``/``local`` mean "the local
    cluster"), a named profile of ``~/.zeroplane/config.yaml`` (``profile`` or
    ``$ZEROPLANE_PROFILE``, see :func:`load_profile`), then the local cluster recorded by
    ``zeroplane cluster up`` if it is alive.
    An address is a dashboard URL ``http://host:port`` (GCS assumed at ``host:6379``) or a
    GCS address ``host[:port]`` (dashboard assumed at ``http://host:8265``). An address that
    matches the live local cluster's GCS address or dashboard URL resolves to the local
    cluster's full info. For a non-local cluster the Serve port is ``$ZEROPLANE_SERVE_PORT``
    or 8000. No network check is done for explicit addresses. A profile's ``auth_token_file``
    becomes ``RAY_AUTH_TOKEN_PATH`` of this process unless ``RAY_AUTH_TOKEN`` or
    ``RAY_AUTH_TOKEN_PATH`` is already set.

    Args:
        address: Explicit address, or None.
        profile: Profile name, or None for ``$ZEROPLANE_PROFILE``.

    Returns:
        The resolved :class:`ClusterInfo`.

    Raises:
        SpecError: the address is malformed or a ``ray://`` client address; a selected profile
            is missing or invalid.
        ZeroplaneError: no address given and no live local cluster.
    """
    candidates = [(address, "--address"), (os.environ.get("RAY_ADDRESS"), "RAY_ADDRESS")]
    prof = None
    if not any(v is not None and v.strip() for v, _ in candidates):
        prof = load_profile(profile)
        if prof is not None:
            candidates.append((prof["address"], f"profile {profile or os.environ.get('ZEROPLANE_PROFILE')!r}"))
            token_file = prof.get("auth_token_file")
            if token_file and not os.environ.get("RAY_AUTH_TOKEN") and not os.environ.get("RAY_AUTH_TOKEN_PATH"):
                os.environ["RAY_AUTH_TOKEN_PATH"] = str(Path(str(token_file)).expanduser())
    for value, source in candidates:
        if value is None or not value.strip():
            continue
        if value.strip().lower() in ("auto", "local"):
            break  # fall through to the local cluster
        info = _parse_address(value, source)
        local = _local_cluster_alive(_read_state())
        if local is not None and (
            _same_endpoint(value, local.address) or _same_endpoint(value, local.dashboard_url)
        ):
            return local
        return info
    local = _local_cluster_alive(_read_state())
    if local is not None:
        return local
    raise ZeroplaneError(_NO_CLUSTER_MESSAGE)


def launcher_command(action: str, config: str | os.PathLike[str]) -> list[str]:
    """The Ray cluster-launcher command for ``zeroplane cluster up|down CONFIG``.

    ``up`` is ``ray up -y CONFIG`` (create or update the cluster: nodes, setup commands, Ray),
    ``down`` is ``ray down -y CONFIG``; both run with the interpreter running zeroplane, so with
    its Ray installation.

    Args:
        action: ``"up"`` or ``"down"``.
        config: Path of a Ray cluster-launcher YAML, e.g. ``cluster/aws.yaml``.

    Returns:
        The argv to run.

    Raises:
        SpecError: an unknown action, or ``config`` is not an existing file.
    """
    if action not in ("up", "down"):
        raise SpecError(f"cluster action {action!r} is not supported; use up or down")
    path = Path(config)
    if not path.is_file():
        raise SpecError(
            f"cluster config {str(config)!r} does not exist; pass a Ray cluster-launcher YAML such as "
            "cluster/aws.yaml, or no CONFIG for the local head"
        )
    return _ray_start_command() + [action, "-y", str(path)]


def run_launcher(action: str, config: str | os.PathLike[str]) -> None:
    """Run :func:`launcher_command` in the foreground (its output goes to this terminal).

    Raises:
        SpecError: see :func:`launcher_command`.
        ZeroplaneError: the launcher exited non-zero.
    """
    cmd = launcher_command(action, config)
    rc = subprocess.run(cmd, check=False).returncode
    if rc != 0:
        raise ZeroplaneError(f"`ray {action} -y {config}` failed with exit code {rc}; see its output above")


def cluster_status(info: ClusterInfo) -> dict[str, Any]:
    """Summarise a cluster through its dashboard HTTP API (with auth headers).

    Uses ``/api/version`` (liveness), ``/nodes?view=summary`` (nodes and their logical
    resources) and ``/api/jobs/`` (jobs by status). Tolerant: an endpoint that fails leaves
    its part empty and adds a message under ``"errors"``.

    Args:
        info: The cluster to query.

    Returns:
        ``{"address", "dashboard_url", "alive": bool, "nodes": [{"node_id", "ip", "alive",
        "cpus", "gpus"}], "resources": {"CPU": total, "GPU": total}, "jobs": {status: n}}``
        plus ``"ray_version"`` when known and ``"errors"`` when something failed.
    """
    base = info.dashboard_url.rstrip("/")
    result: dict[str, Any] = {
        "address": info.address,
        "dashboard_url": info.dashboard_url,
        "alive": False,
        "nodes": [],
        "resources": {"CPU": 0.0, "GPU": 0.0},
        "jobs": {},
    }
    errors: list[str] = []

    try:
        version = _http_get_json(f"{base}/api/version")
        result["alive"] = True
        if isinstance(version, dict) and version.get("ray_version"):
            result["ray_version"] = version["ray_version"]
    except Exception as e:  # noqa: BLE001 - report, don't fail
        errors.append(f"/api/version: {_short_error(e)}")
        result["errors"] = errors
        return result

    try:
        nodes = _nodes_from_summary(_http_get_json(f"{base}/nodes?view=summary", timeout_s=10))
        result["nodes"] = nodes
        cpu = sum(n["cpus"] for n in nodes if n["alive"])
        gpu = sum(n["gpus"] for n in nodes if n["alive"])
        result["resources"] = {"CPU": cpu, "GPU": gpu}
    except Exception as e:  # noqa: BLE001
        errors.append(f"/nodes: {_short_error(e)}")

    try:
        jobs = _http_get_json(f"{base}/api/jobs/", timeout_s=10)
        counts: dict[str, int] = {}
        for job in jobs if isinstance(jobs, list) else []:
            status = str(job.get("status") or "UNKNOWN")
            counts[status] = counts.get(status, 0) + 1
        result["jobs"] = counts
    except Exception as e:  # noqa: BLE001
        errors.append(f"/api/jobs/: {_short_error(e)}")

    if errors:
        result["errors"] = errors
    return result


def _short_error(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}"[:300]


def _nodes_from_summary(payload: Any) -> list[dict[str, Any]]:
    data = payload.get("data", {}) if isinstance(payload, dict) else {}
    summary = data.get("summary") or []
    logical = data.get("nodeLogicalResources") or data.get("node_logical_resources") or {}
    nodes = []
    for entry in summary:
        raylet = entry.get("raylet") or {}
        node_id = raylet.get("nodeId") or raylet.get("node_id") or entry.get("nodeId") or ""
        state = raylet.get("state") or entry.get("state") or ""
        ip = entry.get("ip") or raylet.get("nodeManagerAddress") or ""
        resources = raylet.get("resourcesTotal") or raylet.get("resources_total") or {}
        nodes.append(
            {
                "node_id": node_id,
                "ip": ip,
                "alive": str(state).upper() == "ALIVE",
                "cpus": float(resources.get("CPU", 0) or 0),
                "gpus": float(resources.get("GPU", 0) or 0),
            }
        )
    del logical  # per-node logical usage strings; not part of the summary
    return nodes


__all__ = [
    "ClusterInfo",
    "apply_auth_env",
    "auth_env",
    "auth_headers",
    "cluster_status",
    "join_local_worker",
    "launcher_command",
    "load_profile",
    "resolve_cluster",
    "run_launcher",
    "start_local_head",
    "state_dir",
    "state_file",
    "stop_local_head",
    "stop_local_worker",
]
