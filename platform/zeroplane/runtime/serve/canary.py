"""Canary routing: which version of a traffic split answers a request. Imports no torch and no Ray."""

from __future__ import annotations

import hashlib
import random
from typing import Optional


class CanarySplit:
    """Send ``weight_percent`` % of the requests not pinned to a version to the canary.

    A request whose ``model`` is ``<name>:<canary version>`` goes to the canary, ``<name>:<stable version>``
    stays; otherwise the draw comes from a hash of the ``X-Request-Id`` header when there is one (a retried
    request lands on the same version), else from a random number.

    Args:
        stable_id: ``"<name>:<version>"`` of the stable version.
        canary_id: ``"<name>:<version>"`` of the canary version.
        weight_percent: 0 < w < 100.
        rng: random source for requests without an id (default a fresh ``random.Random()``).
    """

    def __init__(self, stable_id: str, canary_id: str, weight_percent: float,
                 rng: Optional[random.Random] = None) -> None:
        self.stable_id = stable_id
        self.canary_id = canary_id
        self.weight_percent = weight_percent
        self._rng = rng or random.Random()

    def to_canary(self, model: Optional[str], request_id: Optional[str]) -> bool:
        """True when the request goes to the canary.

        Args:
            model: the body's ``model`` field (or None).
            request_id: the ``X-Request-Id`` header (or None).
        """
        if model == self.canary_id:
            return True
        if model == self.stable_id:
            return False
        if request_id:
            draw = int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "big") / 2.0**64
        else:
            draw = self._rng.random()
        return draw * 100.0 < self.weight_percent
