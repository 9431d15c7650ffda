"""The template base of the factory: clone when the request fits, else CreateNew."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

from vmfactory.config import Config, VmConfig
from vmfactory.factory.base import FactoryBase
from vmfactory.factory.direct import DirectFactory
from vmfactory.factory.sequence import prepare_vm
from vmfactory.factory.template import Template, TemplateState
from vmfactory.hypervisor.base import Vm
from vmfactory.hypervisor.qemu import QemuHypervisor

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "default"


class TemplateFactory(FactoryBase):
    """Clones one template built from the config's [vm]; other requests boot directly.

    A request is cloned only if its VM config equals the template's: every field
    of ``VmConfig`` takes part (cpus, memory, limits, accelerator, QEMU, kernel
    arguments), as do the image paths.  Until hot-plug lands, a request for more
    cpus or memory than the template has also falls back.  Each fallback is
    logged with its reason and counted in ``status()``.
    """

    name = "template"

    def __init__(self, config: Config, hypervisor: QemuHypervisor,
                 direct: DirectFactory | None = None) -> None:
        self.config = config
        self.direct = direct or DirectFactory(config, hypervisor)
        self.template = Template(config.paths.template_dir / DEFAULT_TEMPLATE, hypervisor)
        self._create_lock = asyncio.Lock()
        self.clones = 0
        self.fallbacks: Counter[str] = Counter()

    async def ensure_template(self) -> Template:
        async with self._create_lock:
            if self.template.state is TemplateState.READY and self.template.problem():
                logger.warning("template unusable (%s): rebuilding", self.template.problem())
                await self.template.destroy()
            if self.template.state is not TemplateState.READY:
                await self.template.create(await self.direct.spec_for(self.config.vm))
        return self.template

    async def get_vm(self, config: VmConfig | None = None) -> Vm:
        spec = await self.direct.spec_for(config or self.config.vm)
        template = await self.ensure_template()
        reason = template.mismatch(spec)
        if reason is not None:
            self.fallbacks[reason] += 1
            logger.info("request does not fit the template (%s): CreateNew", reason)
            vm = await self.direct.get_vm(spec.vm)
        else:
            vm = await template.clone()
            self.clones += 1
        await prepare_vm(vm)
        return vm

    def status(self) -> dict[str, Any]:
        return {"base": self.name, "clones": self.clones, "fallbacks": dict(self.fallbacks),
                "template": self.template.status(), "direct": self.direct.status()}

    async def close(self) -> None:
        await self.direct.close()
