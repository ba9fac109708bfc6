"""The serving replica's security limits, without Ray: the key cache's staleness bound and read timeout, the
stop-string cap of the request model, and the deadline that stops a generation.

The same limits over real HTTP against a deployed app: tests/integration/test_serve_app.py (security limits).
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time

import pytest
import torch
from pydantic import ValidationError

from zeroplane import serve_keys
from zeroplane.layout import KEYS_FILE
from zeroplane.runtime.serve import app
from zeroplane.storage import Storage


@pytest.fixture
def records():
    """``records(cache)``: ``cache.records()`` run on one event loop kept for the test (a hanging read's
    thread must not be joined before the test releases it), with a guard against a hang."""
    loop = asyncio.new_event_loop()
    yield lambda cache: loop.run_until_complete(asyncio.wait_for(cache.records(), 30))
    loop.close()


def _break(root) -> None:
    """Make the key file unreadable (a directory where the file was): an outage, not "no keys"."""
    path = root / KEYS_FILE
    path.unlink()
    path.mkdir()


def test_cached_keys_are_trusted_through_an_outage_only_up_to_max_stale(tmp_path, records):
    key, _ = serve_keys.create_key(str(tmp_path))
    cache = app._KeyCache(Storage.from_uri(str(tmp_path)), ttl_s=0, max_stale_s=0.2)
    assert serve_keys.verify_key(records(cache), key)

    _break(tmp_path)
    assert serve_keys.verify_key(records(cache), key)  # a hiccup: the copy is still young enough
    time.sleep(0.3)  # past max_stale_s
    with pytest.raises(app.APIError) as err:
        records(cache)
    assert err.value.http_status == 503 and err.value.code == "key_store_unavailable"
    assert "key_max_stale_s" in err.value.message


def test_nothing_cached_and_unreadable_store_is_503(tmp_path, records):
    serve_keys.create_key(str(tmp_path))
    _break(tmp_path)
    cache = app._KeyCache(Storage.from_uri(str(tmp_path)), ttl_s=5, max_stale_s=60)
    with pytest.raises(app.APIError) as err:
        records(cache)
    assert err.value.http_status == 503


def test_a_hanging_key_read_does_not_hold_requests(tmp_path, records, monkeypatch):
    key, _ = serve_keys.create_key(str(tmp_path))
    release = threading.Event()
    real = serve_keys.load_records
    monkeypatch.setattr(serve_keys, "load_records", lambda storage: release.wait() and real(storage))
    cache = app._KeyCache(Storage.from_uri(str(tmp_path)), ttl_s=5, max_stale_s=60, read_timeout_s=0.05)
    try:
        with pytest.raises(app.APIError) as err:  # nothing cached yet: 503, not a wait without end
            records(cache)
        assert err.value.http_status == 503
    finally:
        release.set()
    time.sleep(app.KEY_RETRY_S)
    assert serve_keys.verify_key(records(cache), key)  # the store answers again


def test_key_store_back_after_an_outage_is_read_again(tmp_path, records):
    key, _ = serve_keys.create_key(str(tmp_path))
    saved = (tmp_path / KEYS_FILE).read_bytes()
    _break(tmp_path)
    cache = app._KeyCache(Storage.from_uri(str(tmp_path)), ttl_s=0, max_stale_s=60)
    with pytest.raises(app.APIError):
        records(cache)
    shutil.rmtree(tmp_path / KEYS_FILE)
    (tmp_path / KEYS_FILE).write_bytes(saved)
    time.sleep(app.KEY_RETRY_S)
    assert serve_keys.verify_key(records(cache), key)


@pytest.mark.parametrize("stop", ["x" * (app.MAX_STOP_CHARS + 1), ["ok", "y" * (app.MAX_STOP_CHARS + 1)]])
def test_stop_strings_longer_than_the_cap_are_rejected_naming_the_field(stop):
    body = {"prompt": "hi", "stop": stop}
    with pytest.raises(ValidationError) as err:
        app.CompletionRequest.model_validate(body)
    message, param = app._validation_message(err.value.errors(), body, cap=48)
    assert param == "stop"
    assert str(app.MAX_STOP_CHARS) in message and "'stop'" in message
    with pytest.raises(ValidationError):
        app.ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], "stop": stop})


def test_stop_strings_up_to_the_cap_are_accepted():
    stop = ["x" * app.MAX_STOP_CHARS] * app.MAX_STOP_STRINGS
    assert app.CompletionRequest.model_validate({"prompt": "hi", "stop": stop}).stop == stop


def test_generation_rows_stop_at_their_own_deadline():
    now = time.monotonic()
    done = app._PastDeadline([now - 1, now + 3600])(torch.zeros((2, 3), dtype=torch.long), None)
    assert done.tolist() == [True, False]


def test_app_args_take_the_documented_defaults():
    args = app.ServeAppArgs(model_name="m", version="v1", model_uri="/m", storage_path="/s")
    assert args.key_max_stale_s == app.KEY_MAX_STALE_S == 60.0
    assert args.request_timeout_s == app.REQUEST_TIMEOUT_S
    with pytest.raises(ValidationError):
        app.ServeAppArgs(model_name="m", version="v1", model_uri="/m", storage_path="/s", request_timeout_s=0)


def test_a_chunked_body_is_cut_off_once_past_the_limit():
    """A body without Content-Length, 8 times the limit: the reader answers 413 once past MAX_BODY_BYTES
    instead of reading (and buffering) the whole of it."""
    from starlette.requests import Request

    received = 0

    async def receive() -> dict:
        nonlocal received
        received += 64 * 1024
        more = received < 8 * app.MAX_BODY_BYTES
        return {"type": "http.request", "body": b" " * (64 * 1024), "more_body": more}

    scope = {"type": "http", "method": "POST", "path": "/v1/completions",
             "headers": [(b"transfer-encoding", b"chunked")]}
    with pytest.raises(app.APIError) as err:
        asyncio.run(asyncio.wait_for(app._ModelCore._read_json(None, Request(scope, receive)), 30))
    assert err.value.http_status == 413 and str(app.MAX_BODY_BYTES) in err.value.message
    assert received <= app.MAX_BODY_BYTES + 64 * 1024
