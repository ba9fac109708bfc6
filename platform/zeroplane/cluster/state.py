"""The cluster record: :class:`ClusterInfo`, zeroplane's state folder, the state file of the local head
(``<state_dir>/local-cluster.json``), the lock that serialises its start and stop, and the choice of the
local head's private Ray temp dir."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from zeroplane.errors import ZeroplaneError
from zeroplane.names import DEFAULT_HOME, ENV_HOME
from zeroplane.storage import write_file_atomic

STATE_FILE_NAME = "local-cluster.json"
"""Name of the local cluster state file inside :func:`state_dir`."""

LOCK_FILE_NAME = "local-cluster.lock"
"""Name of the advisory lock file inside :func:`state_dir` (see :func:`_state_lock`)."""

DEFAULT_DASHBOARD_PORT = 8265
DEFAULT_GCS_PORT = 6379
DEFAULT_SERVE_PORT = 8000

# Ray puts unix sockets at <temp>/session_<YYYY-mm-dd_HH-MM-SS_ffffff>_<pid>/sockets/<name>
# and AF_UNIX paths must stay under 108 bytes (107 usable). The session part plus the longest
# socket name take about 68 characters, so keep the temp dir itself short.
_MAX_TEMP_DIR_LEN = 36


@dataclass
class ClusterInfo:
    """Where a Ray cluster lives and how zeroplane reaches it.

    Attributes:
        address: GCS address ``host:port`` (what ``ray.init(address=...)`` takes).
        dashboard_url: Dashboard / Jobs API base URL ``http://host:port`` (no trailing slash).
        serve_http_port: TCP port the Ray Serve HTTP proxy listens on (started by whoever
            deploys; zeroplane only picks and records it).
        local: True when zeroplane started this cluster on this machine.
        temp_dir: Ray ``--temp-dir`` of a local cluster (logs, sockets), else None.
        pids: Pids of the head's processes recorded right after start (local only).
        started_at: Start time as Unix seconds (local only), else None.
        storage: Default storage root (``s3://bucket/prefix`` or a folder) of the profile the
            cluster was found through (its ``storage`` key), else None.
        bind_host: Where a local head listens: ``"127.0.0.1"`` (this machine only, the default) or
            ``"0.0.0.0"`` (every interface: reachable from the network, on request); None when
            zeroplane did not start the cluster or its record predates this field.
        auth: Ray authentication of a local head: ``"token"`` (Ray's token required) or
            ``"disabled"`` (``RAY_AUTH_MODE`` other than ``token``: anyone who reaches its ports can
            run code on it); None when not known (a cluster zeroplane did not start).
    """

    address: str
    dashboard_url: str
    serve_http_port: int
    local: bool = False
    temp_dir: Optional[str] = None
    pids: list[int] = field(default_factory=list)
    started_at: Optional[float] = None
    storage: Optional[str] = None
    bind_host: Optional[str] = None
    auth: Optional[str] = None

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
                storage=str(data["storage"]) if data.get("storage") else None,
                bind_host=str(data["bind_host"]) if data.get("bind_host") else None,
                # "auth_mode": the key of state files written before ``auth`` existed.
                auth=str(data.get("auth") or data.get("auth_mode") or "") or None,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"invalid cluster info: {e!r}") from e


def state_dir() -> Path:
    """Return zeroplane's state directory (absolute), creating it if needed.

    Returns:
        ``$ZEROPLANE_HOME`` if set and non-empty, else ``~/.zeroplane``.

    Raises:
        OSError: the directory cannot be created.
    """
    raw = os.environ.get(ENV_HOME) or DEFAULT_HOME
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
    """Create the Ray temp dir ``path`` (mode 0700) and check it is short enough and ours.

    Raises:
        ZeroplaneError: the path is too long for Ray's unix sockets, or belongs to another user.
    """
    if len(path) > _MAX_TEMP_DIR_LEN + 8:
        raise ZeroplaneError(
            f"Ray temp dir {path!r} is too long for unix socket paths; "
            f"set {ENV_HOME} to a shorter path"
        )
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if st.st_uid != os.getuid():
        raise ZeroplaneError(
            f"Ray temp dir {path} belongs to another user (uid {st.st_uid}); "
            f"set {ENV_HOME} to a directory of your own"
        )


def _read_state() -> Optional[dict[str, Any]]:
    """Return the raw state dict, or None if there is no (readable, JSON object) state file."""
    try:
        data = json.loads(state_file().read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_state(state: dict[str, Any]) -> None:
    """Replace the state file with ``state`` (indented JSON, atomically, mode 0600)."""
    text = json.dumps(state, indent=2, sort_keys=True) + "\n"
    write_file_atomic(state_file(), text.encode(), mode=0o600)


def _info_from_state(data: Optional[dict[str, Any]]) -> Optional[ClusterInfo]:
    """The :class:`ClusterInfo` of a raw state dict, or None when it is empty or invalid."""
    if not data:
        return None
    try:
        return ClusterInfo.from_dict(data)
    except ValueError:
        return None


@contextlib.contextmanager
def _state_lock() -> Iterator[None]:
    """Serialise start/stop of the local cluster across processes (advisory flock on
    ``<state_dir>/local-cluster.lock``; blocks until the lock is free)."""
    lock_path = state_dir() / LOCK_FILE_NAME
    with open(lock_path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
