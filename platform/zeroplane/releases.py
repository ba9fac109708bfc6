"""Releases that protect the endpoint: every change of what an application serves is recorded, watched,
and undone when it fails.

A *rollout* (``serve deploy``, ``promote``, ``serve rollback``) goes through :func:`rollout`:

1. what the application serves now is read from Serve (its deployed config), and a history entry
   ``{"id", "at", "command", "from", "to", "outcome": "in progress"}`` is appended to
   ``serve/history/<name>.json`` in the storage (:func:`zeroplane.layout.serve_history_file`);
2. a replica that cannot fit on any node is refused before anything changes ("cannot schedule: …");
3. the new config is applied and watched (:func:`watch`): it succeeds when every deployment of the
   application is HEALTHY on the new versions; it fails *at the first* replica start-up failure Serve
   reports (the replica's own error is the message), when Serve reports replicas that could not be
   scheduled for ``schedule_timeout_s`` while the resources they need are not free (replicas that are
   only slow to start, with the resources free, are waited for), or after ``timeout_s``;
4. on failure the config that was serving before is applied again (Serve keeps the previous
   version's replicas during a failed in-place update, so they answer throughout and nothing restarts),
   or the application is removed when there was none; the entry records the outcome, the reason, what
   was restored and how long the decision took.

``serve rollback`` returns to the ``from`` state of the newest change that took effect (not registry
order); a rollback is itself a change, so a second one returns to where the first started (as
``kubectl rollout undo`` does). Serve's own rolling update does the replica-by-replica work; this module only decides and
records. No ray/torch imports (Serve is reached through :class:`zeroplane.serving.ServeClient`).
"""

from __future__ import annotations

import ast
import re
import time
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Optional

from . import layout
from .errors import NotFoundError, ZeroplaneError, first_line
from .names import CANARY_DEPLOYMENT
from .storage import Storage

#: History entries kept per application (older ones are dropped on append).
HISTORY_KEEP = 200
#: Seconds a rollout may wait for replicas that Serve reports as not scheduled before it is undone.
#: Serve reports them after ``RAY_SERVE_SLOW_STARTUP_WARNING_S`` (30 s by default).
SCHEDULE_TIMEOUT_S = 45.0
#: Seconds between two reads of Serve's state while a rollout is watched.
POLL_S = 0.5

_FAILED_START = "failed to start"
_NOT_SCHEDULED = "to be scheduled"
_RESOURCES_RE = re.compile(r"Resources required for each replica: (\{[^}]*\}), total resources available: (\{[^}]*\})")


class RolloutFailed(ZeroplaneError):
    """A rollout did not reach RUNNING; ``reason`` is the replica's error or the scheduling shortfall."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def now_iso() -> str:
    """The current UTC time, ISO 8601."""
    return datetime.now(timezone.utc).isoformat()


def state_of(app_config: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """What an application config serves: ``{"version", "canary": {"version", "weight_percent"} | None}``,
    or None for no config (the application does not exist)."""
    args = (app_config or {}).get("args") or {}
    if not args.get("version"):
        return None
    canary = args.get("canary") or None
    return {"version": args["version"],
            "canary": {"version": canary["version"], "weight_percent": float(canary["weight_percent"])} if canary else None}


def describe(state: Optional[Dict[str, Any]]) -> str:
    """``v1``, ``v1 90% / v2 10%`` or ``nothing``."""
    if not state:
        return "nothing"
    c = state.get("canary")
    if not c:
        return state["version"]
    if not c["weight_percent"]:  # the drain step of a rollout that removes the canary
        return f"{state['version']} (draining canary {c['version']})"
    return f"{state['version']} {100 - c['weight_percent']:g}% / {c['version']} {c['weight_percent']:g}%"


class History:
    """The deployment history of one application, kept in the storage as a JSON list (oldest first).

    Updates go through :meth:`zeroplane.storage.Storage.update_json` (file lock locally, conditional
    writes on S3), so two operators' rollouts never lose each other's entries.
    """

    def __init__(self, storage: Storage, name: str) -> None:
        self.storage, self.name = storage, name
        self.path = storage.path(layout.serve_history_file(name))

    def entries(self) -> List[Dict[str, Any]]:
        """Every kept entry, oldest first ([] when there is none).

        Raises:
            DamagedFileError: the history file is not JSON (a damaged history is never written over).
        """
        if not self.storage.exists(self.path):
            return []
        doc = self.storage.read_json(self.path)
        return [e for e in doc if isinstance(e, dict)] if isinstance(doc, list) else []

    def append(self, entry: Dict[str, Any]) -> Dict[str, Any]:
        """Append ``entry`` with the next ``id`` (1, 2, …); returns it as stored."""
        out: Dict[str, Any] = {}

        def change(doc: Any) -> List[Dict[str, Any]]:
            old = [e for e in doc if isinstance(e, dict)] if isinstance(doc, list) else []
            out.clear()
            out.update({"id": max((int(e.get("id", 0)) for e in old), default=0) + 1, **entry})
            return (old + [dict(out)])[-HISTORY_KEEP:]

        self.storage.update_json(self.path, change)
        return out

    def update(self, entry_id: int, **fields: Any) -> None:
        """Set ``fields`` on entry ``entry_id`` (nothing happens when it was dropped meanwhile)."""
        def change(doc: Any) -> Optional[List[Dict[str, Any]]]:
            if not isinstance(doc, list):
                return None
            return [{**e, **fields} if isinstance(e, dict) and e.get("id") == entry_id else e for e in doc]

        self.storage.update_json(self.path, change)

    def last_effective(self) -> Optional[Dict[str, Any]]:
        """The newest entry whose change took effect (``outcome`` ``running``), or None."""
        return next((e for e in reversed(self.entries()) if e.get("outcome") == "running"), None)


def replica_error(message: str) -> str:
    """The replica's own error from a Serve deployment message: the last ``SomeError: text`` line of the
    traceback Serve quotes (module prefixes dropped), else the message's first line."""
    text = message.split("Error:\n", 1)[-1] if "Error:\n" in message else message
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        m = re.match(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$", ln)
        if m:
            return f"{m.group(1).rsplit('.', 1)[-1]}: {m.group(2)}"
    return lines[0] if lines else message


def fits_available(message: str) -> bool:
    """Whether Serve's slow-scheduling ``message`` shows every resource a replica needs as free in the
    cluster (its "total resources available"): then the replica is slow to start (worker processes starting
    on a loaded machine, a runtime environment being set up), not unschedulable. False when the message
    does not say. The figure is the cluster's sum, so a replica that fits no single node can still read as
    fitting; such a rollout then ends at the rollout's overall timeout instead (and :func:`check_fits`
    refuses most of those up front)."""
    m = _RESOURCES_RE.search(message)
    if not m:
        return False
    try:
        need, free = (ast.literal_eval(g) for g in m.groups())  # Ray prints Python or JSON dicts
        return all(float(v) <= float(free.get(k, 0.0)) for k, v in need.items())
    except (ValueError, SyntaxError, TypeError, AttributeError):
        return False


def unschedulable(message: str) -> str:
    """``cannot schedule: need {...} per replica, have {...}`` from Serve's slow-scheduling message."""
    m = _RESOURCES_RE.search(message)
    if not m:
        return "cannot schedule the new replicas: " + message.splitlines()[0]
    return f"cannot schedule: need {m.group(1)} per replica, the cluster has {m.group(2)} available"


def check_fits(replica_resources: Dict[str, float], nodes: List[Dict[str, float]]) -> None:
    """Refuse a replica that no node can hold, before anything is deployed.

    Args:
        replica_resources: ``{"CPU": n, "GPU": n, …}`` one replica asks for.
        nodes: each alive node's total resources.

    Raises:
        RolloutFailed: ``cannot schedule: need N CPU per replica, the largest node has M`` (the fix: ask
            for less in the spec's ``serve.ray_actor_options`` or add a bigger node).
    """
    if not nodes:
        return  # nothing known (e.g. an autoscaling cluster scaled to zero): Serve's own report decides
    for res, need in replica_resources.items():
        if not need:
            continue
        best = max(float(n.get(res, 0.0)) for n in nodes)
        if need > best:
            raise RolloutFailed(f"cannot schedule: need {need:g} {res} per replica, the largest node has {best:g}; "
                                f"lower serve.ray_actor_options in the spec or add a node with more {res}")


def messages_of(details: Optional[Dict[str, Any]]) -> frozenset:
    """The application's and its deployments' current status messages (non-empty ones)."""
    d = details or {}
    return frozenset(m for m in [d.get("message")] + [x.get("message") for x in (d.get("deployments") or {}).values()] if m)


def watch(applications: Callable[[], Dict[str, Any]], name: str, state: Dict[str, Any], timeout_s: float,
          schedule_timeout_s: float = SCHEDULE_TIMEOUT_S,
          progress: Optional[Callable[[str], None]] = None, stale: frozenset = frozenset()) -> Dict[str, Any]:
    """Wait until application ``name`` serves ``state`` with every deployment HEALTHY; returns its details.

    Args:
        applications: returns Serve's ``{app name: details}`` (``ServeClient.applications``).
        name: the application.
        state: what it must serve (:func:`state_of` of the applied config).
        timeout_s: the overall bound.
        schedule_timeout_s: how long replicas Serve reports as not scheduled may wait while the resources
            they need are not free (:func:`fits_available`); with them free, until ``timeout_s``.
        progress: called with one line per status change.
        stale: messages present before the config was applied (:func:`messages_of`): they describe the
            previous config and are ignored, and so is a failed status while such a message is still
            shown (Serve has not yet taken up the new config).

    Raises:
        RolloutFailed: a replica failed to start (its error), replicas could not be scheduled for
            ``schedule_timeout_s`` ("cannot schedule: …"), the application is DEPLOY_FAILED/UNHEALTHY, or
            ``timeout_s`` passed.
    """
    started = time.monotonic()
    unscheduled_since: Optional[float] = None
    last = ""
    while True:
        d = applications().get(name) or {}
        status = d.get("status", "NOT_STARTED")
        deps = d.get("deployments") or {}
        healthy = bool(deps) and all(x.get("status") == "HEALTHY" for x in deps.values())
        if status == "RUNNING" and healthy and state_of(d.get("deployed_app_config")) == state:
            return d
        messages = [m for m in (x.get("message") or "" for x in deps.values()) if m and m not in stale]
        failed = next((m for m in messages if _FAILED_START in m), None)
        if failed:
            raise RolloutFailed(replica_error(failed))
        if status in ("DEPLOY_FAILED", "UNHEALTHY") and not (messages_of(d) & stale):
            raise RolloutFailed(replica_error(d.get("message") or next(iter(messages), status)))
        waiting = next((m for m in messages if _NOT_SCHEDULED in m and not fits_available(m)), None)
        now = time.monotonic()
        if waiting:
            unscheduled_since = unscheduled_since or now
            if now - unscheduled_since >= max(0.0, schedule_timeout_s - 30.0):  # Serve reports after 30 s
                raise RolloutFailed(unschedulable(waiting))
        if now - started > timeout_s:
            raise RolloutFailed(f"not RUNNING after {timeout_s:.0f}s (status {status})")
        if progress and status != last:
            progress(f"application {name}: {status}")
            last = status
        time.sleep(POLL_S)


def rollout(serve, storage: Storage, app: Dict[str, Any], command: str, timeout_s: float = 600.0,
            schedule_timeout_s: float = SCHEDULE_TIMEOUT_S, nodes: Optional[List[Dict[str, float]]] = None,
            progress: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Apply one application config, watch it, and restore what was serving if it fails (module docstring).

    Args:
        serve: a :class:`zeroplane.serving.ServeClient`.
        storage: the storage root holding the history.
        app: the application config to apply (:func:`zeroplane.serving.app_config`).
        command: how the operator asked for it (recorded), e.g. ``serve deploy m:v2``.
        timeout_s: bound for the whole rollout.
        schedule_timeout_s: see :func:`watch`.
        nodes: each alive node's total resources, for :func:`check_fits` (None: not checked).
        progress: called with one-line progress messages.

    Returns:
        The history entry as recorded (``outcome`` ``running``).

    Raises:
        RolloutFailed: the rollout failed; the previous config is serving again (the message says what
            failed, what answers now, and that the history has the details).
    """
    name = app["name"]
    say = progress or (lambda _m: None)
    history = History(storage, name)
    details = serve.applications().get(name) or {}
    before, stale = details.get("deployed_app_config"), messages_of(details)
    target = state_of(app)
    entry = history.append({"at": now_iso(), "command": command, "from": state_of(before), "to": target,
                            "outcome": "in progress"})
    started = time.monotonic()
    applied = False
    try:
        if nodes is not None:
            check_fits(_replica_resources(app), nodes)
        step = drain_step(before, app) if _healthy(details, CANARY_DEPLOYMENT) else None
        if step is not None:
            applied = True
            stale = _drain(serve, name, step, timeout_s, schedule_timeout_s, say, stale)
        remaining_s = max(1.0, timeout_s - (time.monotonic() - started))
        try:
            serve.apply(app)
        except ZeroplaneError as e:
            if not applied:
                raise
            raise RolloutFailed(f"Serve refused the config: {first_line(e)}") from None  # undo the drain step
        applied = True
        watch(serve.applications, name, target, remaining_s, schedule_timeout_s, say, stale=stale)
    except RolloutFailed as e:
        decided = time.monotonic() - started
        say(f"rollout of {name} {describe(target)} failed after {decided:.1f}s: {e.reason}")
        restored = (_restore(serve, name, before, timeout_s, say) if applied
                    else f"nothing was changed ({describe(state_of(before))} serving as before)")
        history.update(entry["id"], outcome="failed", reason=e.reason, restored=restored,
                       decision_s=round(decided, 2), finished_at=now_iso())
        raise RolloutFailed(f"{name} {describe(target)} failed: {e.reason}. {restored}; "
                            f"`zeroplane serve history {name}` has the record") from None
    except BaseException as e:  # interrupted or Serve unreachable: record it, restore nothing blindly
        history.update(entry["id"], outcome="interrupted", reason=first_line(e),
                       finished_at=now_iso())
        raise
    history.update(entry["id"], outcome="running", duration_s=round(time.monotonic() - started, 2),
                   finished_at=now_iso())
    return {**entry, "outcome": "running"}


def _healthy(details: Dict[str, Any], deployment: str) -> bool:
    """Whether ``deployment`` of an application (Serve's details) is there and HEALTHY."""
    return ((details.get("deployments") or {}).get(deployment) or {}).get("status") == "HEALTHY"


def _drain(serve, name: str, step: Dict[str, Any], timeout_s: float, schedule_timeout_s: float,
           say: Callable[[str], None], stale: frozenset) -> frozenset:
    """Apply the drain step (:func:`drain_step`) and wait until it runs; returns the messages Serve shows
    then (the next watch ignores them). Best effort: when the step fails (the old canary's new replicas do
    not start, or do not fit next to the new ingress), the rollout goes on and removes the canary directly,
    as it would without the step; a request queued for the canary at that moment may then fail."""
    canary = step["args"]["canary"]["version"]
    say(f"draining canary {canary} before removing it")
    try:
        serve.apply(step)
        watch(serve.applications, name, state_of(step), timeout_s, schedule_timeout_s, say, stale=stale)
    except ZeroplaneError as e:  # RolloutFailed, or Serve refused the step
        say(f"draining canary {canary} failed ({first_line(e)}); removing it directly")
    return messages_of(serve.applications().get(name) or {})


def drain_step(before: Optional[Dict[str, Any]], app: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The intermediate config a rollout applies first when ``app`` removes the canary that ``before`` runs;
    None when it does not.

    Why: Serve deletes a deployment that leaves the config at once, while the old ingress replicas still
    route a share of requests to it until they stop; a request queued for the deleted canary then waits
    until its ingress replica is killed (an HTTP 500). The step is ``app`` with the old canary deployment
    kept (same version and options) at ``weight_percent`` 0: the new ingress routes nothing to it, the old
    ingress replicas finish against a live canary (Serve reports the ingress HEALTHY only when none of its
    replicas is still stopping), and only then does ``app`` remove it. Serve restarts the canary's replicas
    in the step too (a change of the application's arguments is a new code version for all its
    deployments), so the step is best effort (:func:`_drain`) and skipped when the canary is not HEALTHY.
    """
    old = ((before or {}).get("args") or {}).get("canary")
    if not old or (app.get("args") or {}).get("canary") or app.get("import_path") != (before or {}).get("import_path"):
        return None
    canary_deployment = next((d for d in before.get("deployments") or [] if d.get("name") == CANARY_DEPLOYMENT), None)
    return {**app, "args": {**app["args"], "canary": {**old, "weight_percent": 0.0}},
            "deployments": [d for d in app.get("deployments") or [] if d.get("name") != CANARY_DEPLOYMENT]
            + ([canary_deployment] if canary_deployment else [])}


def _restore(serve, name: str, before: Optional[Dict[str, Any]], timeout_s: float,
             say: Callable[[str], None]) -> str:
    """Put back ``before`` (or remove the application when there was none); returns what answers now."""
    try:
        if before is None:
            if name in serve.applications():
                serve.delete(name)
            return f"{name} removed again (nothing was serving before)"
        say(f"restoring {name} {describe(state_of(before))}")
        stale = messages_of(serve.applications().get(name))
        serve.apply(before)
        watch(serve.applications, name, state_of(before), timeout_s, SCHEDULE_TIMEOUT_S, say, stale=stale)
        return f"{name} {describe(state_of(before))} is serving again, as before"
    except Exception as e:  # the restore itself failed: say so plainly, the operator must act
        return f"restoring {describe(state_of(before))} ALSO failed ({str(e).splitlines()[0]}); check `zeroplane serve status`"


def _replica_resources(app: Dict[str, Any]) -> Dict[str, float]:
    """What one replica of ``app``'s first deployment asks for: ``{"CPU": n, "GPU": n, …}``."""
    opts = ((app.get("deployments") or [{}])[0]).get("ray_actor_options") or {}
    res = {"CPU": float(opts.get("num_cpus", 1.0)), "GPU": float(opts.get("num_gpus", 0.0))}
    res.update({k: float(v) for k, v in (opts.get("resources") or {}).items()})
    return res


def rollback_target(history: History, current: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """What ``serve rollback`` returns to: the ``from`` state of the newest change that took effect and
    led to what serves now.

    Raises:
        NotFoundError: no recorded change led to ``current`` (the history is empty, or the application was
            changed outside zeroplane), or that change started from nothing.
    """
    last = history.last_effective()
    if last is None or last.get("to") != current:
        raise NotFoundError(f"no recorded deployment of {history.name} led to what serves now ({describe(current)}); "
                            f"`zeroplane serve history {history.name}` shows the record; deploy a version explicitly")
    if not last.get("from"):
        raise NotFoundError(f"{history.name} {describe(current)} was its first deployment; there is nothing to roll "
                            f"back to (`zeroplane serve delete {history.name}` removes it)")
    return last["from"]
