"""The main job for a person trying vmfactory: boot a VM and show what it costs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from vmfactory.app import make_bases, make_hypervisor, running_daemon
from vmfactory.config import Config
from vmfactory.factory.base import FactoryBase
from vmfactory.factory.spec import image_paths
from vmfactory.util.progress import Progress
from vmfactory.util.tasks import finish


async def boot_once(config: Config, from_template: bool = False) -> dict[str, Any]:
    """Get one VM (cold boot, or a template clone), exercise its agent, stop it."""
    progress = Progress(5 if from_template else 4, prefix="boot: ")
    with progress.step("guest image (built on first use)"):
        await image_paths(config, quiet=False)
    hypervisor = make_hypervisor(config)
    direct, template = make_bases(config, hypervisor)
    factory: FactoryBase = direct
    if from_template:
        factory = template
        with progress.step("template (boot + save on first use)"):
            await template.ensure_template()
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
            await finish(vm.stop())
            await finish(factory.close())
            hypervisor.close()
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


async def factory_demo(config: Config) -> dict[str, Any]:
    """The main job: a factory daemon with a warm pool on its real socket, one VM
    handed out over gRPC, its agent used, released; everything torn down."""
    progress = Progress(6, prefix="demo: ")
    with progress.step("guest image (built on first use)"):
        await image_paths(config, quiet=False)
    async with contextlib.AsyncExitStack() as stack:
        with progress.step(f"start the factory daemon on {config.daemon.socket}"):
            daemon = await stack.enter_async_context(running_daemon(config))
        pool = next(iter(daemon.pools.values()))
        with progress.step(f"fill pool '{pool.name}' (template boot + save, then clones)"):
            t = time.monotonic()
            while len(pool.ready) < pool.config.min_size:
                await asyncio.sleep(0.1)
            fill_s = time.monotonic() - t
        result = await _handout_demo(config, progress)
        with progress.step("run a container in a pooled VM (runtime client, busybox bundle)"):
            result["container"] = await _container_demo(config)
        template = daemon.template.template.record
        return {"pool": pool.name, "pool_size": pool.config.min_size, "fill_s": round(fill_s, 1),
                "template_build_s": template.get("build_seconds"), **result}


async def _handout_demo(config: Config, progress: Progress) -> dict[str, Any]:
    """GetVM over gRPC, the VM's agent asked for its info, the VM released."""
    from vmfactory.agent import AgentClient
    from vmfactory.server.client import FactoryClient

    async with FactoryClient(config.daemon.socket) as client:
        with progress.step("GetVM over gRPC (a warm pool hit)"):
            t = time.monotonic()
            handle = await client.get_vm(client="demo")
            get_ms = (time.monotonic() - t) * 1000
        with progress.step("talk to the VM's agent, release the VM"):
            agent = AgentClient(f"unix:{handle.agent_socket}", config.timeouts.agent_call)
            try:
                t = time.monotonic()
                await agent.wait_ready(config.timeouts.agent_call)
                first_call_ms = (time.monotonic() - t) * 1000
                info = await agent.info(16)
                skew_ms = (info.time_unix_ns - time.time_ns()) / 1e6
            finally:
                await agent.close()
            await client.release(handle.lease_id)
    return {"vm_id": handle.vm_id, "source": handle.source, "get_ms": round(get_ms, 1),
            "daemon_get_ms": round(handle.get_ms, 1),
            "first_agent_call_ms": round(first_call_ms, 1), "kernel": info.kernel_release,
            "clock_skew_ms": round(skew_ms, 1), "random": info.random.hex()}


DEMO_COMMAND = ["sh", "-c", "echo hello from $(hostname), PID $$, in $(uname -r)"]


async def _container_demo(config: Config) -> dict[str, Any]:
    """What a container runtime does with the factory: sandbox on a pooled VM, a
    container from an OCI bundle, its output relayed, everything removed."""
    from runtime_client.bundles.busybox import make_busybox_bundle
    from runtime_client.bundles import load_bundle
    from runtime_client.sandbox import Runtime

    with tempfile.TemporaryDirectory(prefix="vmf-demo-") as tmp:
        bundle = load_bundle(make_busybox_bundle(Path(tmp) / "bundle", DEMO_COMMAND))
        out_r, out_w = os.pipe()
        async with Runtime(config, shim="katashimbuiltin", proxy="noProxy") as rt:
            t0 = time.monotonic()
            first: dict[str, float] = {}
            sandbox = await rt.create_sandbox(f"demo-{os.getpid()}")
            try:
                container = await sandbox.create_container(bundle, f"demo-{os.getpid()}")
                code = await container.run(stdin=None, stdout=out_w, stderr=out_w,
                                           on_first_output=lambda: first.setdefault(
                                               "t", time.monotonic()))
            finally:
                os.close(out_w)
                await finish(sandbox.delete())
            output = os.read(out_r, 4096).decode(errors="replace").strip()
            os.close(out_r)
    ms = {k: round(v, 1) for k, v in {**sandbox.timings, **container.timings}.items()}
    return {"output": output, "exit_code": code, "source": sandbox.vm.source if sandbox.vm
            else "", "first_output_ms": round((first.get("t", t0) - t0) * 1000, 1), **ms}


def format_demo(r: dict[str, Any]) -> str:
    rows = [
        ("template (cold boot + save)", f"{r['template_build_s']} s"),
        (f"pool '{r['pool']}' filled ({r['pool_size']} VMs)", f"{r['fill_s']} s"),
        ("GetVM from the warm pool (client side)", f"{r['get_ms']} ms ({r['source']})"),
        ("  of which in the daemon", f"{r['daemon_get_ms']} ms"),
        ("first gRPC call to the VM's agent", f"{r['first_agent_call_ms']} ms"),
        ("guest kernel", r["kernel"]),
        ("guest clock vs host", f"{r['clock_skew_ms']:+} ms"),
        ("16 random bytes from the guest", r["random"]),
        ("container: sandbox VM from", r["container"]["source"]),
        ("  GetVM / hot-plug root / create", f"{r['container']['get_vm_ms']} / "
                                            f"{r['container']['attach_ms']} / "
                                            f"{r['container']['create_ms']} ms"),
        ("  start / run -> first output byte", f"{r['container']['start_ms']} / "
                                               f"{r['container']['first_output_ms']} ms"),
        ("  its output (exit code " + str(r["container"]["exit_code"]) + ")",
         r["container"]["output"]),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
