"""The API key ``zeroplane serve keys create --save`` keeps on this machine for ``zeroplane complete``:
``<zeroplane home>/api_key``, mode 0600, written atomically."""

from __future__ import annotations

import os
from typing import Optional

from . import names
from .errors import ZeroplaneError


def api_key_path():
    """``<zeroplane home>/api_key``: where ``serve keys create --save`` keeps a key for ``complete``."""
    from .cluster import state_dir

    try:
        return state_dir() / "api_key"
    except OSError as e:
        raise ZeroplaneError(f"zeroplane's folder cannot be used: {e.strerror or e} ({e.filename}); set "
                             f"{names.ENV_HOME} to a folder of your own") from None


def save_api_key(key: str):
    """Write ``key`` to :func:`api_key_path` (mode 0600, atomically); returns the path."""
    from .storage import write_file_atomic

    path = api_key_path()
    write_file_atomic(path, (key + "\n").encode(), mode=0o600)
    return path


def saved_api_key() -> Optional[str]:
    """The key saved by :func:`save_api_key`, or None.

    Raises:
        ZeroplaneError: the file exists but is not a readable text file.
    """
    path = api_key_path()
    if not path.exists():
        return None
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ZeroplaneError(f"cannot read the saved API key {path}: {getattr(e, 'strerror', None) or e}; "
                             "recreate it with `zeroplane serve keys create --save` or pass --api-key") from None


def check_writable_file(path) -> None:
    """Refuse a destination that cannot become a regular file: a folder there, or a parent that is a file.

    Raises:
        ZeroplaneError: naming the path and the problem.
    """
    if path.is_dir():
        raise ZeroplaneError(f"{path} is a folder; cannot save a key there (set ZEROPLANE_HOME to a folder of your own)")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir() or not os.access(parent, os.W_OK):
                raise ZeroplaneError(f"cannot save a key under {parent}: not a writable folder "
                                     "(set ZEROPLANE_HOME to a folder of your own)")
            return
