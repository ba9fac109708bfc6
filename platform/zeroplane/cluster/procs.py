"""Finding and ending the processes of a Ray node zeroplane started, and only those.

A process is ours when it is a pid recorded at start whose start time still matches (so a reused pid
is never hit), when its command line references one of our private Ray temp dirs (or our GCS address),
or when it descends from one of those. Nothing here runs ``ray stop`` or matches a process by name
alone; this process and its ancestors are never signalled. ``psutil`` is imported lazily.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from typing import Any, Optional

from zeroplane.errors import ZeroplaneError

# Processes whose death means the head is gone (their names as psutil reports them).
_CORE_PROCESS_NAMES = ("gcs_server", "raylet")


def _path_pattern(paths: list[str], addresses: Optional[list[str]] = None) -> Optional[re.Pattern[str]]:
    """Regex for a command-line argument that references one of our paths or addresses.

    A path matches only as a whole path (``/x/ray`` matches ``--temp-dir=/x/ray`` and
    ``/x/ray/session_1/logs`` but not ``/x/ray2``); a GCS ``host:port`` only as a whole
    address (not ``host:63790``). None when there is nothing to match.
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
    """True when the ``psutil.Process`` has exited (zombies count as gone)."""
    import psutil

    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def _procs_referencing(pattern: Optional[re.Pattern[str]]) -> list[Any]:
    """Live processes of this user whose command line matches ``pattern`` (see :func:`_path_pattern`)."""
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
    """Recorded processes (``{pid: {"create_time", "name"}}``) still running with the same start time
    (pid-reuse safe)."""
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
    proc_meta: dict[str, Any], temp_dirs: list[str], addresses: Optional[list[str]] = None
) -> dict[int, Any]:
    """Recorded procs + procs referencing our temp dir(s) or GCS address + descendants, by pid.

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
    """``{str(pid): {"create_time": unix seconds, "name"}}`` of ``procs``, for the state file."""
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


def _end_node_procs(
    proc_meta: dict[str, Any], temp_dirs: list[str], addresses: list[str], grace_s: float
) -> set[int]:
    """End recorded pids, processes referencing ``temp_dirs``/``addresses``, and descendants,
    re-scanning (up to 5 times) while new ones appear; return the pids ended.

    Raises:
        ZeroplaneError: a process survived SIGKILL.
    """
    ended: set[int] = set()
    for _ in range(5):  # new workers may spawn while the raylet dies: re-scan
        procs = _collect_head_procs(proc_meta, temp_dirs, addresses)
        procs = {pid: p for pid, p in procs.items() if pid not in ended or not _is_gone(p)}
        if not procs:
            break
        ended |= _terminate(procs, grace_s)
    return ended
