"""A real local Ray shared by the integration tests (started once per session)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """A new local Ray instance with 4 logical CPUs (2 training workers + a Serve replica fit on 2 cores).

    ``address="local"`` always starts a fresh instance: without it Ray 2.60 joins any cluster that
    ``ray start`` left running on this machine, which may belong to someone else.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
