"""Ray token authentication (on by default since Ray 2.60) for zeroplane's clients.

Where the token comes from (the same sources Ray reads), the environment a Ray client needs to send it,
the HTTP header for plain dashboard requests, and making sure a token exists before a new local head
starts. The token value is never printed, logged or put into an error message.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Optional

from zeroplane.errors import ZeroplaneError

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


def _read_token() -> Optional[str]:
    """Return the Ray auth token from the same sources Ray uses, or None.

    Order: ``RAY_AUTH_TOKEN``, the file named by ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``
    (the last only when ``RAY_AUTH_TOKEN_PATH`` is unset).
    """
    token = os.environ.get(ENV_AUTH_TOKEN, "").strip()
    if token:
        return token
    try:
        token = _token_path().read_text().strip()
    except OSError:
        return None
    return token or None


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
    ``RAY_AUTH_MODE`` says otherwise, and a token is generated (mode 0600) at
    ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token`` if none exists.

    Returns:
        True if the head should start with ``RAY_AUTH_MODE=token``.

    Raises:
        ZeroplaneError: the token file cannot be created.
    """
    mode = _auth_mode_env()
    if mode is not None and mode != "token":
        return False
    if _read_token() is not None:
        return True
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
        return True  # Someone else just created it.
    except OSError as e:
        raise ZeroplaneError(f"cannot create Ray auth token file {path}: {e.strerror}") from e
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return True
