"""Job-spec schema and loading: YAML file + ``--set`` overrides -> validated ``JobSpec``.

Imports no ray/torch. Errors are ``SpecError`` (exit 2) naming the field path, the value and the fix.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import yaml
from pydantic import ValidationError

from ..errors import SpecError, first_line
from .model import PRESETS, JobSpec

__all__ = ["JobSpec", "PRESETS", "load_spec", "parse_spec", "apply_overrides", "format_validation_error", "json_schema"]


_INT_RE = re.compile(r"[+-]?\d+")
_FLOAT_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


#: ``scheme://user:password@`` in a URL: what error messages mask.
_URL_USERINFO = re.compile(r"([a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)


#: Largest spec file read, in bytes: a job spec is a page of YAML; this bounds what a mistaken path
#: (a device, a FIFO, a data file) can make validation read.
MAX_SPEC_BYTES = 1 << 20


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases (``*name``): a few hundred bytes of nested aliases expand to
    billions of nodes ("billion laughs"), and a job spec never needs them."""

    def compose_node(self, parent, index):  # noqa: D102  (PyYAML's hook)
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _AliasError(f"line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) are not allowed "
                              "in job specs; write the value out")
        return super().compose_node(parent, index)


class _AliasError(yaml.YAMLError):
    """An alias in a spec or ``--set`` value."""


def _yaml(text: str) -> Any:
    """``text`` parsed as YAML with the safe loader, aliases refused (:class:`_NoAliasLoader`)."""
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506  (a SafeLoader subclass)


def _parse_scalar(text: str) -> Any:
    """Parse a ``--set`` value: numbers as decimal numbers (``1e-3`` -> 0.001, ``0123`` -> 123, unlike
    YAML 1.1), anything else with YAML rules (``true`` -> bool, ``{a: 1}`` -> dict, else a string)."""
    raw = text.strip()
    if _INT_RE.fullmatch(raw):
        return int(raw, 10)
    if _FLOAT_RE.fullmatch(raw):
        return float(raw)
    try:
        return _numbers_to_float(_yaml(text))
    except _AliasError as e:
        raise SpecError(f"--set {text!r}: {e}") from None
    except RecursionError:
        raise SpecError(f"--set value {text[:40]!r}…: nested too deeply to be a spec value") from None
    except yaml.YAMLError:
        return text


def _numbers_to_float(obj: Any) -> Any:
    """Turn strings that are plain decimal floats (``1e-3``, which YAML 1.1 leaves a string) into floats."""
    if isinstance(obj, dict):
        return {k: _numbers_to_float(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_numbers_to_float(v) for v in obj]
    if isinstance(obj, str) and not _INT_RE.fullmatch(obj.strip()) and _FLOAT_RE.fullmatch(obj.strip()):
        return float(obj)
    return obj


def apply_overrides(data: Dict[str, Any], overrides: Iterable[str]) -> Dict[str, Any]:
    """Apply ``key.path=value`` overrides to a raw spec mapping (in place, also returned).

    Args:
        data: the raw YAML mapping.
        overrides: strings like ``train.max_steps=10`` or ``scaling.resources_per_worker={CPU: 2}``.

    Raises:
        SpecError: an override without ``=`` or one that walks into a non-mapping.
    """
    for item in overrides:
        if "=" not in item:
            raise SpecError(f"--set {item!r}: expected key.path=value, e.g. --set train.max_steps=10")
        key, _, raw = item.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise SpecError(f"--set {item!r}: empty key; use e.g. --set train.max_steps=10")
        node = data
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                where = ".".join(parts[: i + 1])
                raise SpecError(f"--set {item!r}: '{where}' is {nxt!r}, not a mapping; override '{where}' itself")
            node = nxt
        node[parts[-1]] = _parse_scalar(raw)
    return data


def format_validation_error(err: ValidationError, source: str = "spec") -> str:
    """Render a pydantic ValidationError as lines ``source: field.path = value: problem``."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if e["type"] == "extra_forbidden":
            close = _close_fields(e["loc"])
            hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
            msg = f"unknown field; {hint}remove it or fix the spelling (`zeroplane spec schema` lists the fields)"
        elif e["type"] == "missing":
            msg = "required field is missing; add it"
        value = e.get("input")
        if isinstance(value, str):
            value = _URL_USERINFO.sub(r"\1***@", value)  # never print a password given inside a URL
        shown = "" if e["type"] == "missing" or isinstance(value, dict) else f" = {json.dumps(value, default=str)}"
        lines.append(f"{source}: {loc}{shown}: {msg}")
    return "\n".join(lines)


def _close_fields(loc) -> List[str]:
    """Field names of the model at ``loc[:-1]`` that look like the unknown ``loc[-1]`` (difflib)."""
    import difflib

    from pydantic import BaseModel

    model: Any = JobSpec
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    names = list(getattr(model, "model_fields", {}))
    return difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6)


def parse_spec(data: Any, source: str = "spec", check_local_files: bool = False) -> JobSpec:
    """Validate a raw mapping into a ``JobSpec``.

    Args:
        data: the raw mapping.
        source: what error lines start with (the file name).
        check_local_files: also require a local ``data.source`` to match a file on this machine (where the
            spec is resolved and submitted; the driver and workers re-validate without it).

    Raises:
        SpecError: the mapping is not a mapping or fails validation.
    """
    if not isinstance(data, dict):
        raise SpecError(f"{source}: the spec must be a YAML mapping with at least `name:`, got {type(data).__name__}")
    try:
        return JobSpec.model_validate(data, context={"local_files": check_local_files})
    except ValidationError as err:
        raise SpecError("invalid spec\n" + format_validation_error(err, source)) from None


def load_spec(path: str | os.PathLike, overrides: Optional[List[str]] = None) -> JobSpec:
    """Read a YAML job spec, apply ``--set`` overrides and validate it.

    Args:
        path: YAML file.
        overrides: ``key.path=value`` strings applied before validation.

    Raises:
        SpecError: unreadable file, bad YAML, bad override or invalid field.
    """
    p = Path(path)
    try:
        if p.exists() and (not p.is_file() or p.stat().st_size > MAX_SPEC_BYTES):
            raise SpecError(f"spec file {str(p)!r} is not a YAML job spec (not a regular file, or over "
                            f"{MAX_SPEC_BYTES // 1024} KiB); give the path of one (see jobs/)")
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"spec file {str(p)!r} is not UTF-8 text; give a YAML job spec (see jobs/)") from None
    except OSError as e:
        raise SpecError(f"spec file {str(p)!r}: {e.strerror or e}; give the path of a YAML job spec (see jobs/)") from None
    try:
        data = _yaml(text)
    except RecursionError:
        raise SpecError(f"{p}: YAML nested too deeply to be a job spec") from None
    except _AliasError as e:
        raise SpecError(f"{p}: {e}") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{p}: not valid YAML: {first_line(e)}") from None
    if data is None:
        data = {}
    if isinstance(data, dict):
        ds = data.get("deepspeed")
        if isinstance(ds, dict) and isinstance(ds.get("overrides"), dict):  # untyped: no pydantic coercion
            ds["overrides"] = _numbers_to_float(ds["overrides"])
        apply_overrides(data, overrides or [])
    return parse_spec(data, source=str(p), check_local_files=True)


def json_schema() -> Dict[str, Any]:
    """The JSON schema of ``JobSpec`` (descriptions included)."""
    return JobSpec.model_json_schema()
