"""The Ray cluster launcher (``ray up`` / ``ray down``) for ``zeroplane cluster up|down CONFIG``, and the
``ray`` CLI command line of the interpreter running zeroplane (which the local head starts with too)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Union

from zeroplane.errors import SpecError, ZeroplaneError

from .auth import check_token_file


def _ray_cli() -> list[str]:
    """argv prefix of the ``ray`` CLI of this interpreter (so of zeroplane's Ray installation)."""
    return [sys.executable, "-m", "ray.scripts.scripts"]


def launcher_command(action: str, config: Union[str, os.PathLike[str]]) -> list[str]:
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
    return _ray_cli() + [action, "-y", str(path)]


def _mounted_token_files(config: Path) -> list[Path]:
    """Local files that ``config``'s ``file_mounts`` copy to the nodes as a Ray token (a source or a
    destination named ``auth_token``), as absolute paths; ``[]`` when the YAML cannot be read (``ray up``
    then reports it)."""
    import yaml

    try:
        mounts = (yaml.safe_load(config.read_text()) or {}).get("file_mounts") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return []
    if not isinstance(mounts, dict):
        return []
    return [
        Path(str(local)).expanduser().absolute()
        for remote, local in mounts.items()
        if "auth_token" in (Path(str(remote)).name, Path(str(local)).name)
    ]


def run_launcher(action: str, config: Union[str, os.PathLike[str]]) -> None:
    """Run :func:`launcher_command` in the foreground (its output goes to this terminal).

    Before ``up``, each Ray token file that the config's ``file_mounts`` copy to the nodes is made
    private (mode 0600; see :func:`zeroplane.cluster.auth.check_token_file`): ``ray up`` syncs with
    ``rsync -a``, which keeps the mode, so a world-readable token would arrive world-readable.

    Raises:
        SpecError: see :func:`launcher_command`.
        ZeroplaneError: a mounted token file is readable by others and not ours to tighten (nothing
            is run then), or the launcher exited non-zero.
    """
    cmd = launcher_command(action, config)
    if action == "up":
        for token_file in _mounted_token_files(Path(config)):
            check_token_file(token_file)
    rc = subprocess.run(cmd, check=False).returncode
    if rc != 0:
        raise ZeroplaneError(f"`ray {action} -y {config}` failed with exit code {rc}; see its output above")
