"""The Ray cluster zeroplane talks to: finding it, starting and stopping the local head, its status.

One module per concern:

* :mod:`.state` -- :class:`ClusterInfo` (the cluster record), ``state_dir()`` / ``state_file()``, the
  state lock, reading and writing the local head's record, the choice of its Ray temp dir.
* :mod:`.auth` -- Ray token authentication (on by default since Ray 2.60): ``auth_env``,
  ``apply_auth_env``, ``auth_headers``, making sure a token exists for a new head, keeping the token
  file private (``check_token_file``) and warning when the token would cross the network in clear text
  (``warn_if_token_in_clear``).
* :mod:`.local` -- ports and the local head: ``start_local_head`` (on loopback unless asked otherwise),
  ``stop_local_head``.
* :mod:`.procs` -- finding and ending the processes of a node zeroplane started (and only those).
* :mod:`.address` -- addresses, profiles of ``~/.zeroplane/config.yaml`` (``load_profile``) and
  ``resolve_cluster``.
* :mod:`.status` -- ``cluster_status``: nodes, resources and jobs through Ray's state API.
* :mod:`.launcher` -- the Ray cluster launcher (``ray up`` / ``ray down``): ``launcher_command``,
  ``run_launcher``.

Design rules: ``ray`` is never imported at module level (the CLI must start fast); zeroplane only ever
ends processes it started (never ``ray stop``, never a kill by process name); the token value is never
printed, logged or put into an error message.
"""

from __future__ import annotations

from .address import exact_api_address, load_profile, resolve_cluster
from .auth import _refresh_ray_auth_cache, apply_auth_env, auth_env, auth_headers
from .launcher import launcher_command, run_launcher
from .local import start_local_head, stop_local_head
from .state import ClusterInfo, state_dir, state_file
from .status import cluster_status

# ``_refresh_ray_auth_cache`` is re-exported for the integration tests of other modules that reset Ray's
# cached auth mode after changing the environment (``cluster._refresh_ray_auth_cache()``).

__all__ = [
    "ClusterInfo",
    "apply_auth_env",
    "auth_env",
    "auth_headers",
    "cluster_status",
    "exact_api_address",
    "launcher_command",
    "load_profile",
    "resolve_cluster",
    "run_launcher",
    "start_local_head",
    "state_dir",
    "state_file",
    "stop_local_head",
]
