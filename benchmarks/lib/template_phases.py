"""The template benchmark's measurements: cold boots and clones one at a time
(latency), then N clones and N direct boots alive at once (memory per VM)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from benchmarks.lib.host import MemoryLow, check_room
from benchmarks.lib.output import progress
from benchmarks.lib.stats import mean
from vmfactory.config import Config
from vmfactory.factory.direct import DirectFactory
from vmfactory.factory.sequence import prepare_vm
from vmfactory.factory.template import Template, TemplateState
from vmfactory.hypervisor.base import Vm, new_vm_id
from vmfactory.app import make_hypervisor

PREFIX = "template:"
TEMPLATE_NAME = "bench"
# Per-VM memory guess before one was measured: guest RAM plus TCG/QEMU overhead.
OVERHEAD_GUESS_MIB = 256


class Bench:
    """The factory, the template and every VM the benchmark started, for cleanup."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.hypervisor = make_hypervisor(config)
        self.factory = DirectFactory(config, self.hypervisor)
        self.template = Template(config.paths.template_dir / TEMPLATE_NAME, self.hypervisor,
                                 config.template.standby)
        self.live: list[Vm] = []
        # Largest RSS seen per kind of VM: the cost of the next one, for the memory check.
        self.rss_seen: dict[str, float] = {}

    def check_room(self, kind: str, extra_mib: float = 0.0) -> None:
        """Raise MemoryLow if one more ``kind`` VM would leave < LOW_WATER_MIB available."""
        need = self.rss_seen.get(kind, self.config.vm.memory_mib + OVERHEAD_GUESS_MIB) + extra_mib
        check_room(need, what=f"one more {kind} VM")

    def note_rss(self, kind: str, rss_mib: float) -> None:
        self.rss_seen[kind] = max(self.rss_seen.get(kind, 0.0), rss_mib)

    async def boot(self) -> Vm:
        self.check_room("direct")
        vm = await self.factory.get_vm()
        self.live.append(vm)  # no await in between: a cancelled get_vm stops its own VM
        return vm

    async def clone(self, fresh: bool = False) -> Vm:
        """A clone from a standby QEMU, once the standby fill has caught up (the
        steady state), or ``fresh``: a new QEMU (an imposed vm id skips the standby)."""
        self.check_room("clone")
        if fresh:
            vm = await self.template.clone(new_vm_id())
        else:
            await self.template.standby.settled()
            vm = await self.template.clone()
        self.live.append(vm)
        return vm

    async def stop(self, vms: list[Vm]) -> None:
        """Stop ``vms`` (all at once); report but survive a failing stop."""
        results = await asyncio.gather(*(vm.stop() for vm in vms), return_exceptions=True)
        for vm, res in zip(vms, results):
            if vm in self.live:
                self.live.remove(vm)
            if isinstance(res, BaseException):
                progress(f"{PREFIX} warning: stopping vm {vm.id} failed: {res!r}")

    async def close(self) -> None:
        """Stop every VM still alive and destroy the template."""
        while self.live:
            await self.stop(list(self.live))
        if self.template.state is not TemplateState.CREATING:
            await self.template.destroy()
        await self.factory.close()


@dataclass
class Measurements:
    """What measure() collected, for template_report.assemble()."""

    accel: str
    cold: list[dict[str, float]]
    template: dict[str, Any]
    clones: list[dict[str, float]]
    memory: dict[str, dict[str, Any]]  # "direct" and "clone": memory_phase()'s result
    stopped_early: dict[str, str]


async def prepared_ms(vm: Vm) -> float:
    """Run the get-VM sequence on ``vm`` (as a handout does); its ms, rounded."""
    t = time.monotonic()
    await prepare_vm(vm)
    return round((time.monotonic() - t) * 1000, 3)


Measure = Callable[[Vm], Awaitable[dict[str, float]]]


async def latency_runs(bench: Bench, n: int, stopped_early: dict[str, str], kind: str,
                       measure: Measure, line: Callable[[dict[str, float]], str]
                       ) -> list[dict[str, float]]:
    """``n`` VMs of ``kind`` (direct: a boot, clone: a clone), each measured then
    stopped; fewer when host memory runs low (noted in ``stopped_early``)."""
    label = "cold boot" if kind == "direct" else "clone"
    # With standby QEMUs, every other clone starts a new QEMU: both paths in one run.
    alternate = kind == "clone" and bench.template.standby.count > 0
    runs = []
    for i in range(n):
        try:
            vm = await (bench.boot() if kind == "direct"
                        else bench.clone(fresh=not alternate or i % 2 == 1))
        except MemoryLow as exc:
            progress(f"{PREFIX} [{i + 1}/{n}] {label}: stopping early: {exc}")
            stopped_early["latency_cold" if kind == "direct" else "latency_clone"] = str(exc)
            break
        try:
            run = await measure(vm)
        finally:
            await bench.stop([vm])
        progress(f"{PREFIX} [{i + 1}/{n}] {label}: {line(run)}")
        runs.append(run)
    return runs


async def latency_cold(bench: Bench, n: int,
                       stopped_early: dict[str, str]) -> list[dict[str, float]]:
    async def measure(vm: Vm) -> dict[str, float]:
        mem = vm.memory()
        bench.note_rss("direct", mem.rss_mib)
        return {**vm.timings.as_dict(), "rss_mib": round(mem.rss_mib, 3),
                "pss_mib": round(mem.pss_mib, 3), "uss_mib": round(mem.uss_mib, 3)}
    return await latency_runs(bench, n, stopped_early, "direct", measure,
                              lambda r: f"agent ready in {r['agent_ready_ms']:.0f} ms")


async def build_template(bench: Bench) -> dict[str, Any]:
    spec = await bench.factory.spec_for(bench.config.vm)
    bench.check_room("direct", extra_mib=spec.vm.memory_mib)  # the template VM + its RAM file
    progress(f"{PREFIX} building the template (cold boot + save) in {bench.template.directory}")
    await bench.template.create(spec)
    record = bench.template.record
    info = {"build_s": record["build_seconds"],
            "state_kib": round(record["state_bytes"] / 1024, 1),
            "memory_file_mib": round(record["memory_bytes"] / (1 << 20), 1),
            # What the RAM file really occupies on tmpfs (host memory no process's PSS shows).
            "memory_file_resident_mib":
                round(bench.template.memory_file.stat().st_blocks * 512 / (1 << 20), 1)}
    bench.template.standby.replenish()  # (a clone starts it in the product)
    await bench.template.standby.settled()
    waiting = bench.template.standby.vms()
    # What a QEMU standing by costs the host before it takes a clone's state.
    info["standby_qemus"] = len(waiting)
    info["standby_pss_mib"] = round(mean([v.memory().pss_mib for v in waiting]), 1) \
        if waiting else None
    progress(f"{PREFIX} template ready in {info['build_s']:.1f} s (state {info['state_kib']:.0f} "
             f"KiB, RAM file {info['memory_file_resident_mib']:.0f} MiB on tmpfs)")
    return info


async def latency_clones(bench: Bench, n: int,
                         stopped_early: dict[str, str]) -> list[dict[str, float]]:
    async def measure(vm: Vm) -> dict[str, float]:
        run = {**vm.timings.as_dict(), "prepare_ms": await prepared_ms(vm)}
        bench.note_rss("clone", vm.memory().rss_mib)
        return run
    return await latency_runs(
        bench, n, stopped_early, "clone", measure,
        lambda r: f"{'standby QEMU' if r['standby'] else 'new QEMU'}: agent ready in "
                  f"{r['agent_ready_ms']:.1f} ms (restored at {r['restore_ms']:.1f} ms, "
                  f"get-VM sequence {r['prepare_ms']:.1f} ms)")


async def start_alive(bench: Bench, kind: str, alive: list[Vm]) -> tuple[dict[str, float], float]:
    """One more ``kind`` VM kept alive (a clone goes through the get-VM sequence);
    its timings and RSS (MiB)."""
    vm = await (bench.boot() if kind == "direct" else bench.clone())
    alive.append(vm)
    run = vm.timings.as_dict()
    if kind == "clone":
        run["prepare_ms"] = await prepared_ms(vm)
    rss_mib = vm.memory().rss_mib
    bench.note_rss(kind, rss_mib)
    return run, rss_mib


def checkpoint(alive: list[Vm]) -> dict[str, float]:
    """Mean PSS, USS and RSS (MiB) over the VMs alive now."""
    usage = [v.memory() for v in alive]
    return {"pss_mib": mean([u.pss_mib for u in usage]),
            "uss_mib": mean([u.uss_mib for u in usage]),
            "rss_mib": mean([u.rss_mib for u in usage])}


async def memory_phase(bench: Bench, kind: str, sizes: list[int]) -> dict[str, Any]:
    """Start ``kind`` VMs one by one up to max(sizes); measure all alive at each checkpoint."""
    top = max(sizes)
    alive: list[Vm] = []
    checkpoints: dict[int, dict[str, float]] = {}
    runs: list[dict[str, float]] = []
    stopped_early = None
    try:
        for i in range(top):
            try:
                run, rss_mib = await start_alive(bench, kind, alive)
            except MemoryLow as exc:
                stopped_early = str(exc)
                progress(f"{PREFIX} [{i + 1}/{top}] {kind}: stopping early: {exc}")
                break
            runs.append(run)
            line = (f"{PREFIX} [{i + 1}/{top}] {kind} VMs alive: agent ready in "
                    f"{run['agent_ready_ms']:.0f} ms, RSS {rss_mib:.0f} MiB")
            if len(alive) in sizes:
                c = checkpoints[len(alive)] = checkpoint(alive)
                line += (f"; N={len(alive)}: PSS {c['pss_mib']:.1f}, USS {c['uss_mib']:.1f} "
                         f"MiB per VM")
            progress(line)
    finally:
        if alive:
            progress(f"{PREFIX} stopping {len(alive)} {kind} VMs")
        await bench.stop(alive)
    return {"reached": len(alive), "stopped_early": stopped_early,
            "checkpoints": checkpoints, "runs": runs}


async def measure(bench: Bench, n: int, clones: int, sizes: list[int]) -> Measurements:
    """Latency (cold boots, the template, clones), then memory (clones, direct boots)."""
    stopped_early: dict[str, str] = {}
    spec = await bench.factory.spec_for(bench.config.vm)
    progress(f"{PREFIX} latency: {n} cold boots, accel {spec.accel}")
    cold = await latency_cold(bench, n, stopped_early)
    template_info = await build_template(bench)
    progress(f"{PREFIX} latency: {clones} clones")
    clone_runs = await latency_clones(bench, clones, stopped_early)
    checkpoints = ",".join(map(str, sizes))
    progress(f"{PREFIX} memory: clones, checkpoints N={checkpoints}")
    mem_clone = await memory_phase(bench, "clone", sizes)
    await bench.template.destroy()  # its RAM file is not needed by direct VMs
    progress(f"{PREFIX} memory: direct boots, checkpoints N={checkpoints}")
    mem_direct = await memory_phase(bench, "direct", sizes)
    for kind, phase in (("direct", mem_direct), ("clone", mem_clone)):
        if phase["stopped_early"]:
            stopped_early[f"memory_{kind}"] = phase["stopped_early"]
    return Measurements(spec.accel, cold, template_info, clone_runs,
                        {"direct": mem_direct, "clone": mem_clone}, stopped_early)
