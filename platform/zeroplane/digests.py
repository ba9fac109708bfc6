"""Size and SHA-256 of every file of a folder, recorded before upload and checked after download.

A completion marker (a checkpoint's ``zeroplane_complete.json``, a version's ``zeroplane_version.json``)
that lists only sizes blesses a file that was altered in place (same size) after the marker was
written, and a listing cannot tell a short upload from a short source. So each marker also records
what was *meant* to be written: the digests of the local files, computed before they were uploaded.
Listings keep checking sizes (cheap, no read); whoever reads the bytes anyway (promotion and resume
download a checkpoint, a replica loads a version) hashes its copy and refuses a mismatch by name.

Pure standard library (:mod:`hashlib`); no ray/torch imports.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional

from .errors import ZeroplaneError

#: Bytes read per ``update`` while hashing: large enough that the Python loop costs nothing next to
#: SHA-256 itself (~0.5-2 GB/s per core), small enough to stay out of memory accounting.
CHUNK_BYTES = 4 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of one file, read in :data:`CHUNK_BYTES` pieces.

    Raises:
        OSError: the file cannot be read.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def folder_digests(folder: str | os.PathLike, skip: Iterable[str] = ()) -> Dict[str, Dict[str, object]]:
    """``{relative posix path: {"size": bytes, "sha256": hex}}`` for every file under ``folder``.

    Args:
        folder: a local folder.
        skip: relative paths (or top-level folder names) left out, e.g. the marker being written.

    Raises:
        OSError: a file cannot be read.
    """
    base = Path(folder)
    skip = set(skip)
    out: Dict[str, Dict[str, object]] = {}
    for f in sorted(base.rglob("*")):
        if not f.is_file():
            continue
        rel = f.relative_to(base).as_posix()
        if rel in skip or rel.split("/", 1)[0] in skip:
            continue
        out[rel] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
    return out


def check_folder(folder: str | os.PathLike, expected: Mapping[str, str], what: str,
                 sizes: Optional[Mapping[str, int]] = None) -> int:
    """Check that a local copy holds every recorded file with its recorded SHA-256 (and size).

    Args:
        folder: the local copy (downloaded, or the storage folder itself when it is local).
        expected: ``{relative path: hex sha256}`` from the marker.
        what: the thing checked, for the message (e.g. ``checkpoint s3://b/jobs/j/checkpoint_step_0000010``).
        sizes: ``{relative path: bytes}`` from the marker, checked first (a short file needs no hashing).

    Returns:
        The number of bytes hashed.

    Raises:
        ZeroplaneError: ``<what>: <file> ... does not match its completion marker (...)``, naming up to
            five files that are missing, of another size, or of another content; the fix is to take
            another checkpoint/version or to re-run the step that wrote it.
    """
    base = Path(folder)
    bad = []
    hashed = 0
    for rel, digest in sorted(expected.items()):
        f = base / rel
        if not f.is_file():
            bad.append(f"{rel} (missing)")
            continue
        size = f.stat().st_size
        if sizes is not None and rel in sizes and sizes[rel] != size:
            bad.append(f"{rel} ({size} bytes, marker says {sizes[rel]})")
            continue
        hashed += size
        if sha256_file(f) != digest:
            bad.append(f"{rel} (SHA-256 differs from the marker's)")
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ZeroplaneError(f"{what}: {'; '.join(bad[:5])}{more} does not match its completion marker; the "
                             "data was altered or landed short after the marker was written. Use another "
                             "checkpoint or version, or write this one again")
    return hashed


def sha256_map(digests: Mapping[str, Mapping[str, object]]) -> Dict[str, str]:
    """``{path: hex}`` of :func:`folder_digests`' output (what a marker stores)."""
    return {rel: str(d["sha256"]) for rel, d in sorted(digests.items())}


def size_map(digests: Mapping[str, Mapping[str, object]]) -> Dict[str, int]:
    """``{path: bytes}`` of :func:`folder_digests`' output."""
    return {rel: int(d["size"]) for rel, d in sorted(digests.items())}
