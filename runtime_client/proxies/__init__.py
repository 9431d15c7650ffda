"""Kata's proxy modes: who holds a VM's single agent channel.

=================  ==========================================================
noProxy            the client connects to the agent socket itself; one host
                   client at a time (a katashim process cannot join)
kataProxy          a standalone proxy process owns the channel and serves every
                   host client (runtime, shims, later client processes)
kataProxyBuiltin   the same forwarding inside the client process
noopProxy          a test dummy: connects directly, counts what it was asked
ccProxy            deprecated alias of kataProxy
=================  ==========================================================

``forwarder`` is the ttrpc multiplexer itself, ``sockets`` checks its socket file,
``process`` runs it as a standalone process (``python -m runtime_client.proxies``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import psutil

from runtime_client.modes import canonical_mode
from runtime_client.proxies.forwarder import AgentProxy
from runtime_client.proxies.process import spawn_proxy, stop_proxy
from vmfactory.config import PROXY_ALIASES


PROXY_MODES = ("noProxy", "kataProxy", "kataProxyBuiltin", "noopProxy")


def canonical_proxy(name: str) -> str:
    """``name`` with deprecated aliases resolved (``ccProxy`` -> ``kataProxy``)."""
    return canonical_mode("proxy", name, PROXY_MODES, PROXY_ALIASES)


class Proxy(ABC):
    """Started once per sandbox; gives the addresses clients connect to."""

    name: ClassVar[str]

    def __init__(self, agent_socket: Path, sandbox_dir: Path) -> None:
        self.agent_socket = agent_socket
        self.sandbox_dir = sandbox_dir

    @property
    def upstream(self) -> str:
        return f"unix:{self.agent_socket}"

    @abstractmethod
    async def start(self) -> str:
        """Start serving; return the address this client uses."""

    @property
    def shared_address(self) -> str | None:
        """An address other host clients (shims) may use at the same time, if any."""
        return None

    async def stop(self) -> None:
        """Stop serving; idempotent."""

    def record(self) -> dict[str, Any]:
        return {"mode": self.name}


class NoProxy(Proxy):
    name = "noProxy"

    async def start(self) -> str:
        return self.upstream


class NoopProxy(NoProxy):
    """Test dummy: behaves like noProxy and counts the calls made on it."""

    name = "noopProxy"

    def __init__(self, agent_socket: Path, sandbox_dir: Path) -> None:
        super().__init__(agent_socket, sandbox_dir)
        self.started = self.stopped = 0

    async def start(self) -> str:
        self.started += 1
        return self.upstream

    async def stop(self) -> None:
        self.stopped += 1


class BuiltinProxy(Proxy):
    """The forwarder runs in this process; its socket serves this client's shims."""

    name = "kataProxyBuiltin"

    def __init__(self, agent_socket: Path, sandbox_dir: Path) -> None:
        super().__init__(agent_socket, sandbox_dir)
        self._proxy = AgentProxy(self.upstream, sandbox_dir / "proxy.sock")

    async def start(self) -> str:
        await self._proxy.start()
        return self._proxy.address

    @property
    def shared_address(self) -> str | None:
        return self._proxy.address

    async def stop(self) -> None:
        await self._proxy.stop()


class StandaloneProxy(Proxy):
    """A proxy process per sandbox; it outlives the client that started it."""

    name = "kataProxy"

    def __init__(self, agent_socket: Path, sandbox_dir: Path, pid: int = 0) -> None:
        super().__init__(agent_socket, sandbox_dir)
        self.listen = sandbox_dir / "proxy.sock"
        self.pid = pid

    @property
    def address(self) -> str:
        return f"unix:{self.listen}"

    async def start(self) -> str:
        if not self.alive():
            self.pid = await spawn_proxy(self.upstream, self.listen,
                                         log=self.sandbox_dir / "proxy.log")
        return self.address

    def alive(self) -> bool:
        return bool(self.pid) and psutil.pid_exists(self.pid) and self.listen.exists()

    @property
    def shared_address(self) -> str | None:
        return self.address

    async def stop(self) -> None:
        if self.pid:
            stop_proxy(self.pid, self.listen)
            self.pid = 0

    def record(self) -> dict[str, Any]:
        return {"mode": self.name, "pid": self.pid, "socket": str(self.listen)}


_MODES: dict[str, type[Proxy]] = {cls.name: cls for cls in
                                  (NoProxy, NoopProxy, BuiltinProxy, StandaloneProxy)}


def make_proxy(name: str, agent_socket: Path, sandbox_dir: Path,
               record: dict[str, Any] | None = None) -> Proxy:
    """The proxy for mode ``name``; ``record`` restores a standalone proxy's pid."""
    cls = _MODES[canonical_proxy(name)]
    if cls is StandaloneProxy:
        return StandaloneProxy(agent_socket, sandbox_dir, int((record or {}).get("pid", 0)))
    return cls(agent_socket, sandbox_dir)
