"""CreateNew: boot a fresh VM for every request."""

from __future__ import annotations

import logging
from typing import Any

from vmfactory.config import Config, VmConfig
from vmfactory.errors import AgentError, FactoryError
from vmfactory.factory.base import FactoryBase
from vmfactory.factory.sequence import prepare_vm
from vmfactory.factory.spec import resolve_spec
from vmfactory.hypervisor.base import Hypervisor, Vm, VmSpec
from vmfactory.util.tasks import finish

logger = logging.getLogger(__name__)


class DirectFactory(FactoryBase):
    """Cold-boots each VM from the configured image."""

    name = "direct"

    def __init__(self, config: Config, hypervisor: Hypervisor) -> None:
        self.config = config
        self.hypervisor = hypervisor
        self._specs: dict[VmConfig, VmSpec] = {}
        self.booted = 0
        self.failed = 0
        self._closed = False

    async def spec_for(self, vm: VmConfig) -> VmSpec:
        if vm not in self._specs:
            self._specs[vm] = await resolve_spec(self.config, vm)
        return self._specs[vm]

    async def get_vm(self, config: VmConfig | None = None) -> Vm:
        if self._closed:
            raise FactoryError("direct factory is closed")
        spec = await self.spec_for(config or self.config.vm)
        vm = self.hypervisor.create_vm(spec)
        try:
            await vm.start()  # stops the VM itself on failure
            await self._verify(vm)
            await prepare_vm(vm)  # the get-VM sequence, as every base runs it
        except BaseException:
            self.failed += 1
            await finish(vm.stop())
            raise
        self.booted += 1
        return vm

    @staticmethod
    async def _verify(vm: Vm) -> None:
        """The agent's gRPC API must answer too (a cold boot's first call)."""
        if vm.agent is None:
            raise AgentError("ping", f"vm {vm.id} has no agent channel")
        await vm.agent.wait_ready(vm.timeouts.agent_call)

    def status(self) -> dict[str, Any]:
        return {"base": self.name, "booted": self.booted, "failed": self.failed,
                "hypervisor": self.hypervisor.describe()}

    async def close(self) -> None:
        self._closed = True
