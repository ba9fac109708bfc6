"""Ray token authentication (on by default since Ray 2.60) for zeroplane's clients.

Where the token comes from (the same sources Ray reads), the environment a Ray client needs to send it,
the HTTP header for plain dashboard requests, and making sure a token exists before a new local head
starts. The token value is never printed, logged or put into an error message.

Two guards keep the token private: a token file that other users can read is tightened to 0600 when it is
ours, and refused (with the ``chmod`` that fixes it) when it is not; and sending the token over plain
``http://`` to a host other than this machine logs a warning (once per process, logger
``zeroplane.cluster.auth``, which reaches stderr even when nobody configured logging).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import stat
import sys
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from zeroplane.errors import ZeroplaneError

logger = logging.getLogger(__name__)

# Ray's own variable names (ray._private.authentication).
ENV_AUTH_MODE = "RAY_AUTH_MODE"
ENV_AUTH_TOKEN = "RAY_AUTH_TOKEN"
ENV_AUTH_TOKEN_PATH = "RAY_AUTH_TOKEN_PATH"


def _default_token_path() -> Path:
    return Path.home() / ".ray" / "auth_token"


def _token_path() -> Path:
    """The token file Ray reads: ``$RAY_AUTH_TOKEN_PATH`` if set, else ``~/.ray/auth_token``."""
    path_env = os.environ.get(ENV_AUTH_TOKEN_PATH, "").strip()
    return Path(path_env).expanduser() if path_env else _default_token_path()


#: A Ray auth token file holds one token (a few dozen bytes); anything larger is not one.
_TOKEN_FILE_MAX_BYTES = 4096


def check_token_file(path: Path) -> None:
    """Make sure the Ray token file ``path`` is readable by its owner only (mode 0600 or stricter).

    A token file that group or others can read (``ray get-auth-token --generate`` writes mode 0644)
    is tightened to 0600 when it is plainly a token file of the current user: a regular file (not a
    symlink, folder or device) of at most ``_TOKEN_FILE_MAX_BYTES`` bytes. Anything else that others can
    read is refused with the fix, never changed: a path given by mistake (``/tmp``, ``/etc/passwd``, a link
    to either) must not have its mode rewritten. A missing file is fine (nothing to protect).

    Args:
        path: The token file (``~/.ray/auth_token``, ``$RAY_AUTH_TOKEN_PATH``, a profile's
            ``auth_token_file``).

    Raises:
        ZeroplaneError: the file is readable by others and belongs to another user, or its mode
            cannot be changed; the message ends with the fix (``chmod 600 PATH``).
    """
    try:
        st = os.stat(path)
        own = os.lstat(path)
    except OSError:
        return
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISREG(st.st_mode):
        raise ZeroplaneError(f"Ray token file {path} is not a regular file; point RAY_AUTH_TOKEN_PATH (or the "
                             "profile's auth_token_file) at the token file")
    if not mode & 0o077:
        return
    fix = f"run `chmod 600 {path}`"
    if stat.S_ISLNK(own.st_mode) or st.st_size > _TOKEN_FILE_MAX_BYTES:
        raise ZeroplaneError(f"Ray token file {path} is readable by other users (mode {mode:04o}); zeroplane changes "
                             f"the mode only of a plain token file (not a link, at most {_TOKEN_FILE_MAX_BYTES} "
                             f"bytes); {fix} if it really is the token")
    if st.st_uid != os.getuid():
        raise ZeroplaneError(
            f"Ray token file {path} is readable by other users (mode {mode:04o}) and belongs to uid "
            f"{st.st_uid}, so zeroplane neither uses nor changes it; {fix} as its owner"
        )
    try:
        os.chmod(path, 0o600)
    except OSError as e:
        raise ZeroplaneError(
            f"Ray token file {path} is readable by other users (mode {mode:04o}) and cannot be made "
            f"private ({e.strerror}); {fix}"
        ) from e
    logger.warning("Ray token file %s was readable by other users (mode %04o); changed it to 0600", path, mode)


def _read_token() -> Optional[str]:
    """Return the Ray auth token from the same sources Ray uses, or None.

    Order: ``RAY_AUTH_TOKEN``, the file named by ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``
    (the last only when ``RAY_AUTH_TOKEN_PATH`` is unset). The file is checked first (see
    :func:`check_token_file`).

    Raises:
        ZeroplaneError: the token file is readable by others and is not ours to tighten.
    """
    token = os.environ.get(ENV_AUTH_TOKEN, "").strip()
    if token:
        return token
    path = _token_path()
    check_token_file(path)
    try:
        token = path.read_text().strip()
    except OSError:
        return None
    return token or None


_warned_token_in_clear = False
"""Whether :func:`warn_if_token_in_clear` has warned in this process (it warns once)."""


def _is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback IPs (127.0.0.0/8, ``::1``, IPv4-mapped loopback)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        addr = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False  # a name: it may resolve anywhere
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def in_clear_to_another_host(url: str) -> bool:
    """True when ``url`` is plain ``http://`` to a host other than this machine's loopback, i.e. a secret
    sent there (the Ray token, a serving API key) can be read on the network path. A malformed URL: False
    (whoever parses it next says what is wrong)."""
    try:
        parsed = urlparse(url.strip())
        host = parsed.hostname
    except ValueError:
        return False
    return parsed.scheme.lower() == "http" and bool(host) and not _is_loopback_host(host)


def warn_if_token_in_clear(url: str) -> bool:
    """Warn (once per process) when the Ray token is about to be sent to ``url`` in clear text.

    That is: a token is available (see :func:`auth_headers`), ``url`` is ``http://`` (not ``https://``)
    and its host is not this machine (``localhost``, 127.0.0.0/8, ``::1``). Anyone on the network path
    can then read the token and run code on the cluster. The warning goes to the ``zeroplane.cluster.auth``
    logger at WARNING level (stderr when logging is not configured); it names the URL, never the token.

    Args:
        url: Dashboard URL the token is going to, e.g. ``http://10.0.0.10:8265``.

    Returns:
        True when the token would go in clear text (whether or not the warning was already given).

    Raises:
        ZeroplaneError: the token file is readable by others and is not ours to tighten.
    """
    global _warned_token_in_clear
    if not in_clear_to_another_host(url):
        return False
    if _read_token() is None:
        return False
    if not _warned_token_in_clear:
        _warned_token_in_clear = True
        logger.warning(
            "the Ray token goes to %s over plain http://, readable by anyone on the network path; "
            "reach the dashboard over https:// or through an SSH tunnel (`ray dashboard CONFIG`, then "
            "http://127.0.0.1:8265)",
            f"http://{urlparse(url.strip()).netloc}",
        )
    return True


def _auth_mode_env() -> Optional[str]:
    value = os.environ.get(ENV_AUTH_MODE)
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

    Raises:
        ZeroplaneError: the token file is readable by others and is not ours to tighten
            (see :func:`check_token_file`).
    """
    if _auth_mode_env() is None and _read_token() is not None:
        return {ENV_AUTH_MODE: "token"}
    return {}


def apply_auth_env() -> dict[str, str]:
    """Set :func:`auth_env` variables in ``os.environ`` for this process and its children.

    If Ray's native module is already loaded in this process, its cached configuration and
    token are refreshed so that in-process clients (e.g. ``JobSubmissionClient``) see the
    new mode.

    Returns:
        The variables that were set (possibly empty).

    Raises:
        ZeroplaneError: see :func:`auth_env`.
    """
    env = auth_env()
    os.environ.update(env)
    if env or _auth_mode_env() == "token":
        _refresh_ray_auth_cache()
    return env


def _refresh_ray_auth_cache() -> None:
    """Make an already loaded ``ray._raylet`` re-read the auth mode and token from the environment
    (a no-op when it is not loaded: Ray reads the environment when it is first loaded). Never raises."""
    if "ray._raylet" not in sys.modules:
        return
    with contextlib.suppress(Exception):
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def auth_headers(url: Optional[str] = None) -> dict[str, str]:
    """Return HTTP headers for plain requests to the dashboard of a token-auth cluster.

    A dashboard without token auth ignores the header, so it is sent whenever a token is
    available (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``).

    Args:
        url: Where the headers go (default None: not known). When given, a token about to go over
            plain ``http://`` to another machine logs a warning once per process (see
            :func:`warn_if_token_in_clear`); pass it.

    Returns:
        ``{"Authorization": "Bearer <token>"}`` when a token is available, else ``{}``.
        Never print or log the result.

    Raises:
        ZeroplaneError: the token file is readable by others and is not ours to tighten
            (see :func:`check_token_file`).
    """
    token = _read_token()
    if token is None:
        return {}
    if url is not None:
        warn_if_token_in_clear(url)
    return {"Authorization": f"Bearer {token}"}


AUTH_TOKEN = "token"
AUTH_DISABLED = "disabled"


def _ensure_token_for_new_cluster() -> str:
    """Decide whether the new head uses token auth and make sure a token exists.

    Mirrors what ``ray.init()`` does for a new local cluster: token auth is on unless
    ``RAY_AUTH_MODE`` says otherwise, and a token is generated (mode 0600) at
    ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token`` if none exists. Ray 2.60 knows two modes,
    ``token`` and ``disabled``; it treats any ``RAY_AUTH_MODE`` other than ``token`` as disabled.

    Returns:
        :data:`AUTH_TOKEN` (``"token"``) if the head should start with ``RAY_AUTH_MODE=token``, else
        :data:`AUTH_DISABLED` (``"disabled"``: anyone who reaches its ports can run code on it).

    Raises:
        ZeroplaneError: the token file cannot be created, or is readable by others and not ours.
    """
    mode = _auth_mode_env()
    if mode is not None and mode != AUTH_TOKEN:
        return AUTH_DISABLED
    if _read_token() is not None:
        return AUTH_TOKEN
    path = _token_path()
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
        return AUTH_TOKEN  # Someone else just created it.
    except OSError as e:
        raise ZeroplaneError(f"cannot create Ray auth token file {path}: {e.strerror}") from e
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return AUTH_TOKEN
