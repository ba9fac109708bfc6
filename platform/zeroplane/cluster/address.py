"""Which cluster a command talks to: an address (``--address`` / ``RAY_ADDRESS``), a named profile of
``<state_dir>/config.yaml``, or the local head ``zeroplane cluster up`` started."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any, Iterator, Optional
from urllib.parse import urlparse

from zeroplane.errors import SpecError, ZeroplaneError, first_line
from zeroplane.names import ENV_PROFILE, ENV_SERVE_PORT

from .auth import ENV_AUTH_TOKEN, ENV_AUTH_TOKEN_PATH, check_token_file, warn_if_token_in_clear
from .local import _local_cluster_alive
from .state import (
    DEFAULT_DASHBOARD_PORT,
    DEFAULT_GCS_PORT,
    DEFAULT_SERVE_PORT,
    ClusterInfo,
    _read_state,
    state_dir,
)

CONFIG_FILE_NAME = "config.yaml"
"""Name of the profiles file inside :func:`state_dir` (``~/.zeroplane/config.yaml``)."""

PROFILE_KEYS = ("address", "auth_token_file", "storage")
"""The keys a profile may have; only ``address`` is required."""

_NO_CLUSTER_MESSAGE = (
    "no Ray cluster: run `zeroplane cluster up` or pass --address / set RAY_ADDRESS"
)


def _serve_port_env() -> int:
    """The Serve HTTP port of a cluster zeroplane did not start: ``$ZEROPLANE_SERVE_PORT`` or 8000.

    Raises:
        SpecError: the variable is not a port number.
    """
    raw = os.environ.get(ENV_SERVE_PORT, "").strip()
    if not raw:
        return DEFAULT_SERVE_PORT
    try:
        port = int(raw)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise SpecError(f"{ENV_SERVE_PORT} must be a port number 1-65535, got {raw!r}")
    return port


def _format_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _parse_address(address: str, source: str) -> ClusterInfo:
    """The :class:`ClusterInfo` (``local=False``) of a dashboard URL or GCS address; ``source`` names
    where the address came from in error messages.

    Raises:
        SpecError: a ``ray://`` address, an unsupported scheme, or a malformed address.
    """
    addr = address.strip()
    if addr.startswith("ray://"):
        raise SpecError(
            f"{source} {addr!r} is a Ray Client address; zeroplane uses the Jobs API and "
            "needs the dashboard URL, e.g. http://HOST:8265"
        )
    if addr.startswith(("http://", "https://")):
        url = urlparse(addr)
        try:
            port = url.port  # parses it: a port that is not a number in 1..65535 is a mistake made here
        except ValueError:
            port = 0
        if not url.hostname:
            raise SpecError(f"{source} {addr!r} has no host; expected http://HOST:PORT")
        if port == 0 or (url.port is not None and not 1 <= url.port <= 65535):
            raise SpecError(f"{source} {addr!r} has no valid port; expected http://HOST:PORT, e.g. :8265")
        dashboard_url = f"{url.scheme}://{url.netloc}".rstrip("/")
        gcs_address = f"{_format_host(url.hostname)}:{DEFAULT_GCS_PORT}"
        return ClusterInfo(gcs_address, dashboard_url, _serve_port_env(), local=False)
    if "://" in addr:
        raise SpecError(
            f"{source} {addr!r} has an unsupported scheme; use http://HOST:PORT (dashboard) "
            "or HOST:PORT (GCS)"
        )
    if addr.count(":") > 1 and not addr.startswith("["):
        raise SpecError(f"{source} {addr!r}: write an IPv6 address in brackets, [ADDR]:PORT or http://[ADDR]:8265")
    host, sep, port = addr.rpartition(":")
    if not sep or "]" in port:  # bare host (or bare IPv6 in brackets)
        host, port = addr, str(DEFAULT_GCS_PORT)
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise SpecError(
            f"{source} {addr!r} is not a valid address; use http://HOST:PORT (dashboard) "
            "or HOST:PORT (GCS)"
        )
    host = _format_host(host.strip("[]"))
    return ClusterInfo(
        f"{host}:{int(port)}", f"http://{host}:{DEFAULT_DASHBOARD_PORT}", _serve_port_env(), local=False
    )


def _same_endpoint(a: str, b: str) -> bool:
    """True when two addresses/URLs name the same host and port (localhost, 127.0.0.1 and ::1 alike)."""

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


def load_profile(name: Optional[str] = None) -> Optional[dict[str, Any]]:
    """Return a named cluster profile from ``<state_dir>/config.yaml``.

    The file looks like ``profiles: {gpu: {address: http://10.0.0.10:8265, auth_token_file:
    ~/.ray/gpu_token, storage: s3://bucket/zp}}``; only ``address`` is required (see
    :data:`PROFILE_KEYS`).

    Args:
        name: Profile name; default ``$ZEROPLANE_PROFILE``. None/empty selects no profile.

    Returns:
        The profile mapping (a copy), or None when no profile is selected.

    Raises:
        SpecError: a profile is selected but the file is missing or invalid, the profile does not
            exist, lacks ``address`` or has an unknown key.
    """
    import yaml

    name = name or os.environ.get(ENV_PROFILE) or None
    if not name:
        return None
    path = state_dir() / CONFIG_FILE_NAME
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(
            f"profile {name!r} is selected but {path} does not exist; create it with "
            f"`profiles: {{{name}: {{address: http://HOST:8265}}}}` or unset {ENV_PROFILE}"
        ) from None
    except (OSError, yaml.YAMLError) as e:
        raise SpecError(f"{path}: cannot read profiles: {first_line(e)}") from None
    profiles = data.get("profiles") if isinstance(data, dict) else None
    if not isinstance(profiles, dict) or name not in profiles:
        known = ", ".join(sorted(profiles)) if isinstance(profiles, dict) and profiles else "none"
        raise SpecError(f"profile {name!r} is not in {path} (profiles: {known})")
    prof = profiles[name]
    if not isinstance(prof, dict) or not isinstance(prof.get("address"), str) or not prof["address"].strip():
        raise SpecError(f"{path}: profiles.{name}.address is missing; add e.g. address: http://HOST:8265")
    unknown = sorted(set(prof) - set(PROFILE_KEYS))
    if unknown:
        raise SpecError(
            f"{path}: profiles.{name}.{unknown[0]} is not a profile key; use {', '.join(sorted(PROFILE_KEYS))}"
        )
    return dict(prof)


def resolve_cluster(address: Optional[str] = None, profile: Optional[str] = None) -> ClusterInfo:
    """Find the Ray cluster to use.

    Order: the ``address`` argument, env ``RAY_ADDRESS`` (``auto``/``local`` mean "the local
    cluster"), a named profile of ``~/.zeroplane/config.yaml`` (``profile``, or
    ``$ZEROPLANE_PROFILE`` when ``profile`` is None; see :func:`load_profile`), then the local
    cluster recorded by ``zeroplane cluster up`` if it is alive.
    An address is a dashboard URL ``http://host:port`` (GCS assumed at ``host:6379``) or a
    GCS address ``host[:port]`` (dashboard assumed at ``http://host:8265``). An address that
    matches the live local cluster's GCS address or dashboard URL resolves to the local
    cluster's full info. For a non-local cluster the Serve port is ``$ZEROPLANE_SERVE_PORT``
    or 8000. No network check is done for explicit addresses.

    When the cluster comes from a profile, its ``storage`` becomes :attr:`ClusterInfo.storage`
    (the default storage root), and its ``auth_token_file`` becomes ``RAY_AUTH_TOKEN_PATH`` of
    this process unless ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH`` is already set; that file
    is tightened to 0600 if others can read it (see :func:`~zeroplane.cluster.auth.check_token_file`).
    A cluster whose dashboard is plain ``http://`` on another machine, with a token available, logs
    the once-per-process warning of :func:`~zeroplane.cluster.auth.warn_if_token_in_clear`: every
    command sends the token there next.

    Args:
        address: Explicit address, or None.
        profile: Profile name, or None for ``$ZEROPLANE_PROFILE``.

    Returns:
        The resolved :class:`ClusterInfo`.

    Raises:
        SpecError: the address is malformed or a ``ray://`` client address; a selected profile
            is missing or invalid; ``$ZEROPLANE_SERVE_PORT`` is not a port.
        ZeroplaneError: no address given and no live local cluster; or the token file is readable
            by others and not ours to tighten.
    """
    candidates = [(address, "--address"), (os.environ.get("RAY_ADDRESS"), "RAY_ADDRESS")]
    prof = None
    if not any(v is not None and v.strip() for v, _ in candidates):
        name = profile or os.environ.get(ENV_PROFILE) or None
        prof = load_profile(name)
        if prof is not None:
            candidates.append((prof["address"], f"profile {name!r}"))
            token_file = prof.get("auth_token_file")
            if token_file and not os.environ.get(ENV_AUTH_TOKEN) and not os.environ.get(ENV_AUTH_TOKEN_PATH):
                os.environ[ENV_AUTH_TOKEN_PATH] = str(Path(str(token_file)).expanduser())
                check_token_file(Path(os.environ[ENV_AUTH_TOKEN_PATH]))
    info = _resolve_candidates(candidates)
    warn_if_token_in_clear(info.dashboard_url)
    storage = prof.get("storage") if prof is not None else None
    return dataclasses.replace(info, storage=str(storage)) if storage else info


def _resolve_candidates(candidates: list[tuple[Optional[str], str]]) -> ClusterInfo:
    """The first non-empty ``(address, source)`` candidate as a :class:`ClusterInfo` (the live local
    cluster's own info when it names that cluster, or for ``auto``/``local``), else the live local
    cluster.

    Raises:
        SpecError: the first non-empty address is malformed.
        ZeroplaneError: no usable address and no live local cluster.
    """
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


#: Ray's own variable that its API clients prefer over the address they are given (then ``RAY_ADDRESS``).
_RAY_API_SERVER_ADDRESS = "RAY_API_SERVER_ADDRESS"


@contextlib.contextmanager
def exact_api_address(dashboard_url: str) -> Iterator[None]:
    """While constructing a Ray API client, make it use exactly ``dashboard_url``.

    ``JobSubmissionClient`` and ``StateApiClient`` replace the address they are given by
    ``$RAY_API_SERVER_ADDRESS`` or ``$RAY_ADDRESS`` (``ray.dashboard.utils.get_address_for_submission_client``).
    zeroplane has already resolved the address (``--address`` wins over ``RAY_ADDRESS``), so for the
    duration of the block ``RAY_API_SERVER_ADDRESS`` is set to it; the variable is restored afterwards.
    """
    old = os.environ.get(_RAY_API_SERVER_ADDRESS)
    os.environ[_RAY_API_SERVER_ADDRESS] = dashboard_url
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(_RAY_API_SERVER_ADDRESS, None)
        else:
            os.environ[_RAY_API_SERVER_ADDRESS] = old
