"""The factory plugin interface (Kata's VMFactory.NewVM(HypervisorConfig))."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from vmfactory.config import VmConfig
from vmfactory.hypervisor.base import Vm


class FactoryBase(ABC):
    """Makes ready VMs: booted, agent connected and verified."""

    name: str = "abstract"

    @abstractmethod
    async def get_vm(self, config: VmConfig | None = None) -> Vm:
        """A RUNNING VM for ``config`` whose agent answered, after the get-VM
        sequence (factory/sequence.py): reseeded, clock set, grown to ``config``."""

    @abstractmethod
    def status(self) -> dict[str, Any]:
        """Counters and settings, for status pages."""

    @abstractmethod
    async def close(self) -> None:
        """Release everything the base holds; idempotent."""
