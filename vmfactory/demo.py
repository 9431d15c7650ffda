"""The main job for a person trying vmfactory: boot a VM and show what it costs."""

from __future__ import annotations

import time
from typing import Any

from vmfactory.config import Config
from vmfactory.factory.base import FactoryBase
from vmfactory.factory.direct import DirectFactory
from vmfactory.factory.template_factory import TemplateFactory
from vmfactory.factory.spec import image_paths
from vmfactory.hypervisor.qemu import QemuHypervisor
from vmfactory.progress import Progress


async def boot_once(config: Config, from_template: bool = False) -> dict[str, Any]:
    """Get one VM (cold boot, or a template clone), exercise its agent, stop it."""
    progress = Progress(5 if from_template else 4, prefix="boot: ")
    with progress.step("guest image (built on first use)"):
        await image_paths(config, quiet=False)
    hypervisor = QemuHypervisor(config.paths.run_dir, config.timeouts)
    factory: FactoryBase = DirectFactory(config, hypervisor)
    if from_template:
        factory = TemplateFactory(config, hypervisor)
        with progress.step("template (boot + save on first use)"):
            await factory.ensure_template()
    with progress.step("clone to agent ready" if from_template else "cold boot to agent ready"):
        vm = await factory.get_vm()
    try:
        with progress.step("agent: info, set time, reseed"):
            assert vm.agent is not None
            t = time.monotonic()
            await vm.agent.ping()
            ping_ms = (time.monotonic() - t) * 1000
            info = await vm.agent.info(16)
            skew = await vm.agent.set_time()
            reseed = await vm.agent.reseed()
            memory = vm.memory()
    finally:
        with progress.step("stop VM"):
            await vm.stop()
            await factory.close()
    return {
        "vm_id": vm.id, "accel": vm.spec.accel, "cpus": info.cpus_online,
        "kernel": info.kernel_release, "guest_mem_total_mib": round(info.mem_total_kib / 1024, 1),
        "timings_ms": vm.timings.as_dict(), "ping_ms": round(ping_ms, 3),
        "clock_skew_after_set_ms": round(skew.skew_ns / 1e6, 3),
        "reseeded": reseed.reseeded, "random": info.random.hex(),
        "host_memory_mib": {"rss": round(memory.rss_mib, 1), "pss": round(memory.pss_mib, 1),
                            "uss": round(memory.uss_mib, 1)},
    }


def format_boot(r: dict[str, Any]) -> str:
    t = r["timings_ms"]
    rows = [
        ("VM", f"{r['vm_id']} ({r['accel']}, {r['cpus']} vCPU, {r['guest_mem_total_mib']} MiB usable)"),
        ("guest kernel", r["kernel"]),
        ("QEMU start (spawn -> QMP)", f"{t['qemu_start_ms']:.0f} ms"),
        ("restore done (clones only)", f"{t['restore_ms']:.0f} ms"),
        ("kernel (guest uptime at /init)", f"{t['guest_init_s'] * 1000:.0f} ms guest time"),
        ("agent up (guest uptime)", f"{t['guest_agent_ready_s'] * 1000:.0f} ms guest time"),
        ("spawn -> agent ready (host)", f"{t['agent_ready_ms']:.0f} ms"),
        ("agent ping", f"{r['ping_ms']:.2f} ms"),
        ("guest clock after set", f"{r['clock_skew_after_set_ms']:+.3f} ms from host"),
        ("RNG reseeded", "yes" if r["reseeded"] else "no"),
        ("host memory (RSS/PSS/USS)",
         "{rss} / {pss} / {uss} MiB".format(**r["host_memory_mib"])),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def format_status(reply: Any) -> str:
    """The daemon's Status reply as two tables: pools, then VMs."""
    lines = [f"daemon pid {reply.pid}, up {reply.uptime_s:.0f} s, version {reply.version}", ""]
    pools = [("POOL", "BASE", "READY", "MIN", "MAX", "REFILLING", "HANDOUTS", "MISSES",
              "REPLACED")]
    pools += [(p.name, p.base, p.ready, p.min_size, p.max_size, p.refilling, p.handouts,
               p.misses, p.replaced) for p in reply.pools]
    vms = [("VM", "PID", "STATE", "POOL", "LEASE", "CPUS", "MEM MiB", "CPU%", "PSS MiB", "AGE s",
            "SOURCE")]
    vms += [(v.vm_id, v.pid, v.state, v.pool or "-", v.lease_id or "-", v.cpus, v.memory_mib,
             f"{v.cpu_percent:.1f}", f"{v.pss_mib:.0f}", f"{v.age_s:.0f}", v.source)
            for v in reply.vms]
    for rows in (pools, vms):
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
        lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.append("")
    return "\n".join(lines).rstrip()
