"""The template base of the factory: clone when the request fits, else CreateNew.

Templates rotate: after ``template.max_age_s`` or ``template.max_clones`` a new
generation is built in the background while requests keep cloning the current
one; then the two are swapped and the old one removed (its running clones keep
their memory mappings; its standby QEMUs are stopped).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

from vmfactory.config import Config, VmConfig
from vmfactory.errors import VmFactoryError
from vmfactory.factory.base import FactoryBase
from vmfactory.factory.direct import DirectFactory
from vmfactory.factory.sequence import prepare_vm
from vmfactory.factory.template import Template, TemplateState
from vmfactory.hypervisor.base import Hypervisor, Vm
from vmfactory.util.tasks import Supervisor

logger = logging.getLogger(__name__)


class TemplateFactory(FactoryBase):
    """Clones the current template generation; other requests boot directly.

    A request is cloned if its VM config matches the template's in everything
    but cpus and memory (see :meth:`Template.mismatch`); a clone is then grown by
    hot-plug to what was asked.  Any other difference falls back to CreateNew,
    logged with its reason and counted in ``status()``.
    """

    name = "template"

    def __init__(self, config: Config, hypervisor: Hypervisor, direct: DirectFactory,
                 tenant: str = "") -> None:
        self.config = config
        self.hypervisor = hypervisor
        self.direct = direct
        # A tenant's template is its own: clones of different tenants share no memory.
        self.name = f"{config.template.name}-{tenant}" if tenant else config.template.name
        self.template = self._adopt_newest()
        self._create_lock = asyncio.Lock()
        # Rotation runs here, once at a time; its failure keeps the current template.
        self._tasks = Supervisor("template-factory")
        self.clones = 0
        self.rotations = 0
        self.fallbacks: Counter[str] = Counter()

    def _adopt_newest(self) -> Template:
        """The newest saved generation of the configured template; older ones are removed."""
        root, name = self.config.paths.template_dir, self.name
        found = [Template(d, self.hypervisor, self.config.template.standby)
                 for d in (sorted(root.glob(f"{name}.*")) if root.is_dir() else [])]
        for broken in [t for t in found if t.state is not TemplateState.READY]:
            logger.info("removing unfinished template %s", broken.directory.name)
            broken.remove()  # a create that a crash interrupted
        ready = [t for t in found if t.state is TemplateState.READY]
        for stale in ready[:-1]:
            logger.info("removing older template generation %s", stale.directory.name)
            stale.remove()
        return ready[-1] if ready else self._new_generation()

    def _new_generation(self) -> Template:
        directory = self.config.paths.template_dir / f"{self.name}.{time.time_ns()}"
        return Template(directory, self.hypervisor, self.config.template.standby)

    async def ensure_template(self) -> Template:
        async with self._create_lock:
            if self.template.state is TemplateState.READY and self.template.problem():
                logger.warning("template unusable (%s): rebuilding", self.template.problem())
                await self.template.destroy()
            if self.template.state is not TemplateState.READY:
                self.template = self._new_generation()
                await self.template.create(await self.direct.spec_for(self.config.vm))
        return self.template

    def needs_rotation(self) -> str | None:
        """Why the current template should be replaced, or None."""
        record, limits = self.template.record, self.config.template
        if not record:
            return None
        if limits.max_clones and record["clone_count"] >= limits.max_clones:
            return f"{record['clone_count']} clones"
        age = time.time() - record["created_at"]
        if limits.max_age_s and age >= limits.max_age_s:
            return f"{age:.0f} s old"
        return None

    async def get_vm(self, config: VmConfig | None = None) -> Vm:
        spec = await self.direct.spec_for(config or self.config.vm)
        template = await self.ensure_template()
        reason = template.mismatch(spec)
        if reason is not None:
            self.fallbacks[reason] += 1
            logger.info("request does not fit the template (%s): CreateNew", reason)
            return await self.direct.get_vm(spec.vm)  # booted at the size asked
        vm = await template.clone()
        self.clones += 1
        self._maybe_rotate()
        await prepare_vm(vm, spec.vm)
        return vm

    def _maybe_rotate(self) -> None:
        why = self.needs_rotation()
        if why and not self._tasks.running("rotate"):
            logger.info("rotating template %s (%s)", self.template.name, why)
            self._tasks.spawn("rotate", self._rotate)

    async def _rotate(self) -> None:
        """Build the next generation beside the current one, then swap."""
        fresh = self._new_generation()
        try:
            await fresh.create(await self.direct.spec_for(self.config.vm))
        except VmFactoryError as exc:
            logger.error("template rotation failed, keeping the current one: %s", exc)
            return
        async with self._create_lock:
            old, self.template = self.template, fresh
        try:
            await old.destroy()  # its standby QEMUs first: they map its memory file
        finally:
            self.rotations += 1  # counted once the old generation is gone

    async def rotate_now(self) -> None:
        """Rotate immediately and wait for it (CLI and tests)."""
        await self._rotate()

    def status(self) -> dict[str, Any]:
        return {"base": self.name, "clones": self.clones, "rotations": self.rotations,
                "rotation_due": self.needs_rotation(), "fallbacks": dict(self.fallbacks),
                "template": self.template.status(), "direct": self.direct.status()}

    async def close(self) -> None:
        """Stop a rotation in progress (its half-built generation is removed), the
        current template's standby QEMUs and the direct base; the template's files
        stay for :meth:`Template.destroy`."""
        await self._tasks.close()
        await self.template.close_standby()
        await self.direct.close()

