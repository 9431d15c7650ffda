"""Kata's shim modes: how a container process's stdio and signals reach the host.

* ``noopshim``: no I/O relay (the guest gives the process /dev/null stdio);
  signals the client receives are still forwarded, so killing the client
  still reaches the process.
* ``katashimbuiltin``: the client process itself relays stdio
  (:func:`runtime_client.shims.iorelay.relay_io`) and forwards signals.
* ``katashim``: a standalone shim process per container process
  (``python -m runtime_client.shims``) does the same between its own stdio and
  the container process; the client forwards its signals to that shim.  The shim
  opens its own agent connection, so it needs a proxy serving several clients.
* ``ccshim``: deprecated alias of ``katashim``.

``base`` is the interface, ``builtin`` and ``standalone`` the modes, ``iorelay``
the stdio relay, ``signals`` the handlers installed during a run, ``process``
the standalone shim process.
"""

from __future__ import annotations

from runtime_client.shims.base import SHIM_NAMES, Shim, ShimName, canonical_shim, exit_code_of
from runtime_client.shims.builtin import BuiltinShim, NoopShim
from runtime_client.shims.signals import FORWARDED_SIGNALS
from runtime_client.shims.standalone import StandaloneShim, shim_command

_SHIMS: dict[str, type[Shim]] = {
    NoopShim.name: NoopShim,
    BuiltinShim.name: BuiltinShim,
    StandaloneShim.name: StandaloneShim,
}


def make_shim(name: str) -> Shim:
    """The shim for ``name`` (aliases accepted); ClientError if unknown."""
    return _SHIMS[canonical_shim(name)]()


__all__ = ["FORWARDED_SIGNALS", "SHIM_NAMES", "BuiltinShim", "NoopShim", "Shim", "ShimName",
           "StandaloneShim", "canonical_shim", "exit_code_of", "make_shim", "shim_command"]
