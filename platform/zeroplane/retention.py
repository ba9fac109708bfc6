"""What a live endpoint needs is never deleted: ``zeroplane models gc`` and version lineage.

A version is *protected* while Serve runs it (stable or canary), while it is what ``serve rollback``
would return to (:func:`zeroplane.releases.rollback_target`), or while it is among the newest
``keep_latest`` of its model. Everything else is collectable: :func:`plan` lists it (a dry run changes
nothing), :func:`collect` deletes exactly the listed versions, each marker first (so that a version
is never half there: without its marker it no longer counts as registered), then its folder. The
version number stays claimed (``models/<name>/.claims/vN``), so a number is never reused.

:func:`lineage` answers "where did this version come from and where did it go": job → spec →
checkpoint step → data → version → every deployment of it, from the version's marker, the
checkpoint's ``meta.json`` (when the checkpoint still exists) and the deployment history.

No ray/torch imports: what Serve runs is passed in as ``{app name: deployed app config}``.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

from . import layout
from .errors import NotFoundError
from .registry import VERSION_MARKER, Registry
from .releases import History, rollback_target, state_of
from .storage import Storage


def _versions_of(state: Optional[Dict[str, Any]]) -> Set[str]:
    """The versions a served state names (stable and canary)."""
    if not state:
        return set()
    return {state["version"]} | ({state["canary"]["version"]} if state.get("canary") else set())


def protected(storage: Storage, served: Dict[str, Dict[str, Any]], model: str) -> Dict[str, str]:
    """``{version: why}`` for the versions of ``model`` that must stay.

    Args:
        storage: the storage root (for the deployment history).
        served: ``{app name: deployed app config}`` of the applications Serve runs now.
        model: the model name (its application has the same name).
    """
    why: Dict[str, str] = {}
    current = state_of(served.get(model))
    for v in _versions_of(current):
        why[v] = "serving" if v == (current or {}).get("version") else "canary"
    if current:
        try:
            for v in _versions_of(rollback_target(History(storage, model), current)):
                why.setdefault(v, "rollback target")
        except NotFoundError:
            pass  # no recorded change led here: nothing to return to
    return why


def plan(registry: Registry, served: Dict[str, Dict[str, Any]], models: Optional[Iterable[str]] = None,
         keep_latest: int = 0) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """Split registered versions into what stays and what can be collected.

    Args:
        registry: the registry.
        served: ``{app name: deployed app config}`` from Serve.
        models: model names to look at (default every model).
        keep_latest: the newest N versions of each model stay as well (default 0).

    Returns:
        ``(keep, collect)``: lists of ``{"name", "version", "uri", "why"}`` (``why`` empty in ``collect``).

    Raises:
        SpecError: a model name is not valid; ValueError: ``keep_latest`` < 0.
    """
    if keep_latest < 0:
        raise ValueError(f"keep_latest {keep_latest}: give 0 or more")
    keep, drop = [], []
    for name in (list(models) if models is not None else registry.models()):
        guard = protected(registry.storage, served, name)
        versions = registry.versions(name)
        newest = {r["version"] for r in versions[len(versions) - keep_latest:]} if keep_latest else set()
        for r in versions:
            why = guard.get(r["version"]) or ("newest" if r["version"] in newest else "")
            row = {"name": name, "version": r["version"], "uri": r["uri"], "why": why}
            (keep if why else drop).append(row)
    return keep, drop


def collect(registry: Registry, rows: List[Dict[str, Any]]) -> List[str]:
    """Delete the versions of ``rows`` (from :func:`plan`): marker first, then the folder.

    Returns:
        ``name:version`` of each deleted version.
    """
    done = []
    for row in rows:
        folder = registry.version_dir(row["name"], row["version"])
        registry.storage.delete_file(f"{folder}/{VERSION_MARKER}")
        registry.storage.delete_dir(folder)
        done.append(f"{row['name']}:{row['version']}")
    return done


def lineage(storage: Storage, name: str, version: str) -> Dict[str, Any]:
    """Where a version came from and every deployment of it.

    Returns:
        ``{"model", "version", "uri", "registered_at", "job_id", "checkpoint": {"step", "uri",
        "exists"}, "spec": {...} | None, "data": {...} | None, "metrics", "verification",
        "deployments": [history entries that deployed it, as stable or canary]}``.

    Raises:
        SpecError: a bad name or version; NotFoundError: no such version.
    """
    rec = Registry(storage).get(name, version)
    src = rec.get("source") or {}
    meta: Optional[Dict[str, Any]] = None
    step = src.get("step")
    if src.get("job_id") and isinstance(step, int):
        try:
            path = storage.path(layout.checkpoint_dir(src["job_id"], step))
            meta = storage.read_json(f"{path}/{layout.CKPT_META}") if storage.exists(f"{path}/{layout.CKPT_META}") else None
        except Exception:  # a foreign or malformed source: lineage shows what the marker says
            meta = None
    spec = (meta or {}).get("spec")
    data = (meta or {}).get("dataset") or ((spec or {}).get("data") if spec else None)
    deployments = [e for e in History(storage, name).entries()
                   if version in _versions_of(e.get("to"))]
    return {"model": name, "version": version, "uri": rec.get("uri"), "registered_at": rec.get("registered_at"),
            "job_id": src.get("job_id"),
            "checkpoint": {"step": step, "uri": src.get("checkpoint"), "exists": meta is not None},
            "spec": spec, "data": data, "metrics": rec.get("metrics"), "verification": rec.get("verification"),
            "deployments": deployments}
