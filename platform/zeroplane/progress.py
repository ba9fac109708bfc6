"""Progress events: rank 0 prints one ``ZEROPLANE_PROGRESS {json}`` line per event (``runtime/train/loop.py``);
the SDK follows the driver's log and parses them here. Pure Python; imports nothing of ours but names."""

from __future__ import annotations

import json
from typing import Any, Dict, List

from .names import PROGRESS_PREFIX


class ProgressParser:
    """Progress events from log text fed in chunks of any size (a line may span chunks).

    Rank 0 prints ``ZEROPLANE_PROGRESS {json}`` lines; Ray may forward the same line twice (with a
    ``(RayTrainWorker pid=…)`` prefix), so an event seen before is dropped. Lines that are not JSON are
    skipped.
    """

    def __init__(self) -> None:
        self._partial = ""
        self._seen: set = set()

    def feed(self, text: str) -> List[Dict[str, Any]]:
        """New events in ``text`` (complete lines only; a trailing partial line waits for the next chunk)."""
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        return self._events(lines)

    def close(self) -> List[Dict[str, Any]]:
        """Events of the last, unterminated line."""
        rest, self._partial = self._partial, ""
        return self._events([rest])

    def _events(self, lines: List[str]) -> List[Dict[str, Any]]:
        out = []
        for line in lines:
            i = line.find(PROGRESS_PREFIX)
            if i < 0:
                continue
            raw = line[i + len(PROGRESS_PREFIX):].strip()
            if raw in self._seen:
                continue
            try:
                ev = json.loads(raw)
            except json.JSONDecodeError:
                continue
            self._seen.add(raw)
            out.append(ev)
        return out


def parse_progress(log_text: str) -> List[Dict[str, Any]]:
    """Progress events printed by rank 0 (``ZEROPLANE_PROGRESS {json}`` lines), in order, deduplicated."""
    p = ProgressParser()
    return p.feed(log_text) + p.close()
