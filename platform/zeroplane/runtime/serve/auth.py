"""API keys on a replica: a bounded-staleness cache of the key store and the bearer check.

See :mod:`zeroplane.serve_keys` for the key file. Imports no torch and no Ray.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Mapping, Optional

from zeroplane import serve_keys
from zeroplane.errors import first_line
from zeroplane.runtime.serve.protocol import KEY_READ_TIMEOUT_S, KEY_RETRY_S, APIError
from zeroplane.storage import Storage

logger = logging.getLogger("ray.serve")

#: Seconds a key store read may stay unanswered before the replica fails Serve's health check
#: (:meth:`KeyCache.health`): requests never wait on it longer than ``KEY_READ_TIMEOUT_S``, but a read stuck
#: this long (a hung network mount, a wedged S3 client) is a replica worth replacing.
KEY_READ_HANG_S = 30.0


class KeyCache:
    """A replica's copy of the API key records of a storage root (``<root>/serve/api_keys.json``).

    The records are re-read at most every ``ttl_s`` seconds, so a new or revoked key takes effect within
    that. One read runs at a time, in a worker thread; requests arriving meanwhile wait for that same read,
    each for at most ``read_timeout_s``. When a read fails or does not answer in time, the cached records
    are still used while they are younger than ``max_stale_s`` (a storage hiccup costs nothing); past
    that, or with nothing cached, :meth:`records` raises a 503 — a revoked key must not keep working
    through a long outage. After a failure the next read starts no sooner than ``KEY_RETRY_S`` (1 s) later.

    Args:
        storage: the storage root holding the key file.
        ttl_s: seconds between re-reads (``key_cache_ttl_s``, default 5).
        max_stale_s: seconds the cached records are trusted while the store cannot be read
            (``key_max_stale_s``, default ``KEY_MAX_STALE_S`` = 60).
        read_timeout_s: most seconds a request waits for a read; default ``KEY_READ_TIMEOUT_S`` (5).
        hang_s: seconds after which a read still unanswered makes :meth:`health` report it; default
            ``KEY_READ_HANG_S`` (30).
    """

    def __init__(self, storage: Storage, ttl_s: float, max_stale_s: float,
                 read_timeout_s: float = KEY_READ_TIMEOUT_S, hang_s: float = KEY_READ_HANG_S) -> None:
        self._storage = storage
        self._hang_s = hang_s
        self._read_started = float("inf")  # time.monotonic() when the read in flight started
        self._ttl_s = ttl_s
        self._max_stale_s = max_stale_s
        self._read_timeout_s = read_timeout_s
        self._records: list[dict] = []
        self._loaded_at = float("-inf")  # time.monotonic() of the last successful read
        self._retry_at = float("-inf")  # no read starts before this (after a failure)
        self._read: Optional[asyncio.Future] = None  # the read in flight, shared by the requests waiting

    async def records(self) -> list[dict]:
        """The key records to check a bearer key against (re-read first when due; see the class).

        Raises:
            APIError: 503 ``key_store_unavailable`` — the store cannot be read and the cached records are
                older than ``max_stale_s`` (or none were ever read).
        """
        now = time.monotonic()
        if now >= self._retry_at and now - self._loaded_at >= min(self._ttl_s, self._max_stale_s):
            if self._read is None or self._read.done():
                self._read_started = time.monotonic()
                self._read = asyncio.ensure_future(self._load())
            try:  # shield: a waiter giving up (or going away) must not cancel the shared read
                await asyncio.wait_for(asyncio.shield(self._read), self._read_timeout_s)
            except asyncio.TimeoutError:
                self._failed(f"no answer within {self._read_timeout_s:g} s")
        if time.monotonic() - self._loaded_at < self._max_stale_s:
            return self._records
        stale = "" if self._loaded_at == float("-inf") else (
            f" and this replica's copy of the keys is older than key_max_stale_s ({self._max_stale_s:g} s)"
        )
        raise APIError(503, f"the API key store cannot be read right now{stale}, so no key can be checked; "
                            "retry shortly", code="key_store_unavailable")

    async def _load(self) -> None:
        try:
            records = await asyncio.to_thread(serve_keys.load_records, self._storage)
        except Exception as e:  # noqa: BLE001 - storage errors of any kind
            self._failed(f"{type(e).__name__}: {first_line(e)}")
            return
        self._records, self._loaded_at = records, time.monotonic()

    def _failed(self, reason: str) -> None:
        self._retry_at = time.monotonic() + KEY_RETRY_S
        logger.warning(
            "reading API keys from %s failed (%s); cached keys are %.1f s old, trusted up to key_max_stale_s=%g s",
            self._storage.uri, reason, time.monotonic() - self._loaded_at, self._max_stale_s,
        )

    def health(self) -> Optional[str]:
        """None, or why this replica should be replaced: a key store read unanswered for over ``hang_s``."""
        if self._read is not None and not self._read.done():
            waited = time.monotonic() - self._read_started
            if waited > self._hang_s:
                return f"a read of the API key store from {self._storage.uri} has hung for {waited:.0f} s"
        return None


async def authorize(keys: Optional[KeyCache], headers: Mapping[str, str]) -> None:
    """Check a request's bearer key (before its body is read or any model work is done).

    Args:
        keys: the replica's key cache, or None when auth is off (then every request passes).
        headers: the request headers (case-insensitive mapping, e.g. Starlette's).

    Raises:
        APIError: 401 ``missing_api_key`` / ``invalid_api_key`` (with ``WWW-Authenticate: Bearer``), or the
            503 of :meth:`KeyCache.records` when the key store cannot be read.
    """
    if keys is None:
        return
    challenge = {"WWW-Authenticate": "Bearer"}
    header = headers.get("authorization")
    if not header:
        raise APIError(
            401, "missing API key: send the header 'Authorization: Bearer <key>'",
            code="missing_api_key", headers=challenge,
        )
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise APIError(
            401, "malformed Authorization header: expected 'Bearer <key>'",
            code="invalid_api_key", headers=challenge,
        )
    if not serve_keys.verify_key(await keys.records(), token):
        raise APIError(401, "invalid or revoked API key", code="invalid_api_key", headers=challenge)
