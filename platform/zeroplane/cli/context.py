"""The CLI's context object (``ctx.obj``): the resolved ``--address``/``--profile`` and one lazily
built :class:`zeroplane.sdk.Client`. Commands get it with ``@pass_zp``; nothing travels through
environment variables between the root group and the commands.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import click


@dataclass
class ZpContext:
    """What every command may use.

    Attributes:
        profile: the ``--profile`` given to the root group (or ``$ZEROPLANE_PROFILE``), else None.
        address: the ``--address`` given to the command (or ``$RAY_ADDRESS``), else None.
    """

    profile: Optional[str] = None
    address: Optional[str] = None
    _client: Any = field(default=None, repr=False)

    @property
    def client(self):
        """The SDK client for ``address``/``profile``, built on first use (it resolves the cluster only
        when a call needs one)."""
        if self._client is None:
            from ..sdk import Client

            self._client = Client(self.address, profile=self.profile)
        return self._client


def pass_zp(f):
    """Decorator: call ``f(zp, ...)`` with the :class:`ZpContext` of the current invocation."""
    return click.pass_obj(f)


def set_address(ctx: click.Context, _param: click.Parameter, value: Optional[str]) -> Optional[str]:
    """Callback of ``--address``: records it in ``ctx.obj`` (see :data:`zeroplane.cli.options.ADDRESS`)."""
    obj = ctx.ensure_object(ZpContext)
    if value:
        obj.address = value
    return value
