"""S3 for the tests: a real moto S3 server (``python -m moto.server``) on a free local port.

Only S3 lives here. ``s3_server`` runs once per session; ``s3_bucket`` gives a test its own bucket and
points the AWS environment variables of the test process at the server (restored afterwards).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from typing import Dict, Iterator

import pytest

#: Credentials moto accepts; they are fake, but the tests still check they are never printed.
S3_ENV = {"AWS_ACCESS_KEY_ID": "zeroplane-test-key", "AWS_SECRET_ACCESS_KEY": "zeroplane-test-secret-do-not-print",
          "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[Dict[str, str]]:
    """Start moto's standalone S3 server; yields the environment that points clients at it.

    The dict holds ``AWS_ENDPOINT_URL`` plus fake credentials and region (see ``S3_ENV``); pass it to
    subprocesses or set it with ``monkeypatch``. The server is killed (by its own pid) at the end.
    """
    import requests

    port = _free_port()
    log = open(os.devnull, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if requests.get(f"{endpoint}/moto-api/", timeout=2).status_code < 500:
                break
        except requests.RequestException:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"moto S3 server did not start on {endpoint} (exit code {proc.poll()})")
        time.sleep(0.2)
    try:
        yield {"AWS_ENDPOINT_URL": endpoint, **S3_ENV}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture()
def s3_bucket(s3_server, monkeypatch) -> str:
    """A fresh bucket on the moto server; the test process's AWS environment points at the server.

    Returns:
        The bucket name.
    """
    import boto3

    for k in ("AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    bucket = f"zp-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"]).create_bucket(Bucket=bucket)
    return bucket
