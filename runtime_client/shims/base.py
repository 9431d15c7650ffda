"""The shim interface: how one container process's stdio and signals are
handled on the host, and the names of Kata's modes."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar, Literal

from runtime_client.modes import canonical_mode
from vmfactory.agent.client import AgentClient
from vmfactory.config import SHIM_ALIASES

ShimName = Literal["noopshim", "katashim", "katashimbuiltin", "ccshim"]
SHIM_NAMES: tuple[str, ...] = ("noopshim", "katashim", "katashimbuiltin", "ccshim")


def canonical_shim(name: str) -> str:
    """``name`` with deprecated aliases resolved (``ccshim`` -> ``katashim``)."""
    return canonical_mode("shim", name, [n for n in SHIM_NAMES if n not in SHIM_ALIASES], SHIM_ALIASES)

def exit_code_of(returncode: int) -> int:
    """A subprocess return code in shell form: 128+N for death by signal N."""
    return 128 - returncode if returncode < 0 else returncode

class Shim(ABC):
    """How one container process's stdio and signals are handled on the host."""

    name: ClassVar[str]
    # False only for noopshim: the guest then gives the process /dev/null stdio.
    relays_io: ClassVar[bool]
    # True for katashim: its standalone process opens its own agent connection.
    needs_shared_agent: ClassVar[bool]

    @abstractmethod
    async def run(self, conn: AgentClient, container_id: str, exec_id: str, *,
                  terminal: bool, stdin: int | None = 0, stdout: int = 1, stderr: int = 2,
                  shim_address: str | None = None,
                  on_first_output: Callable[[], None] | None = None) -> int:
        """Relay (per mode), forward signals, return the exit code."""
