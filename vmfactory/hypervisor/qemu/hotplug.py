"""Hot-plug over QMP: vCPUs, memory DIMMs, and disks on the PCIe root ports."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from vmfactory.errors import HypervisorError
from vmfactory.hypervisor.base import SERIAL_RE
from vmfactory.hypervisor.qemu.argv import DISK_PORTS
from vmfactory.util.tasks import finish

logger = logging.getLogger(__name__)

MEMORY_BLOCK_MIB = 128
DISK_POLL_S = 0.01

Qmp = Callable[..., Awaitable[Any]]


async def plug_cpus(qmp: Qmp, have: int, count: int) -> int:
    """Add ``count`` vCPUs to a VM that has ``have``; the new total."""
    slots = [s for s in await qmp("query-hotpluggable-cpus") if "qom-path" not in s]
    if len(slots) < count:
        raise HypervisorError("hot-plug", f"only {len(slots)} free vCPU slots, need {count}")
    for slot in sorted(slots, key=lambda s: sorted(s["props"].items()))[:count]:
        await qmp("device_add", driver=slot["type"], id=f"cpu{have}", **slot["props"])
        have += 1
    return have


async def plug_memory(qmp: Qmp, have_mib: int, mib: int) -> int:
    """Add at least ``mib`` MiB as one DIMM to a VM that has ``have_mib``; MiB added."""
    # The guest onlines memory in 128 MiB blocks: a smaller DIMM would be wasted.
    size = -(-mib // MEMORY_BLOCK_MIB) * MEMORY_BLOCK_MIB
    await qmp("object-add", **{"qom-type": "memory-backend-ram", "id": f"hpmem{have_mib}",
                               "size": size << 20})
    await qmp("device_add", driver="pc-dimm", id=f"dimm{have_mib}", memdev=f"hpmem{have_mib}")
    return size


async def attach_disk(qmp: Qmp, path: Path, serial: str, read_only: bool) -> str:
    """Hot-plug ``path`` as a virtio-blk disk the guest finds by ``serial``; its node name."""
    if not SERIAL_RE.match(serial):
        raise HypervisorError("attach-disk", f"serial {serial!r} must match {SERIAL_RE.pattern}")
    if not path.is_file():
        raise HypervisorError("attach-disk", f"disk image not found: {path}")
    node = f"disk-{serial}"
    await qmp("blockdev-add", **{
        "node-name": node, "driver": "raw", "read-only": read_only,
        "file": {"driver": "file", "filename": str(path), "read-only": read_only}})
    try:
        await _plug_disk(qmp, node, serial)
    except BaseException:
        await finish(drop_node(qmp, node))
        raise
    return node


async def _plug_disk(qmp: Qmp, node: str, serial: str) -> None:
    for port in range(DISK_PORTS):
        try:
            # addr 0: a root port has one slot; without it QEMU would put a
            # second device on another slot of a taken port, which the guest
            # never scans, instead of refusing.
            await qmp("device_add", driver="virtio-blk-pci", drive=node, id=node,
                      bus=f"hp{port}", addr="0", serial=serial)
            return
        except HypervisorError as exc:
            if "not available" not in str(exc):  # that port is taken: try the next
                raise
    raise HypervisorError("attach-disk", f"all {DISK_PORTS} disk ports are in use")


async def drop_node(qmp: Qmp, node: str, deadline: float = 0.0) -> None:
    """Delete a block node; the unplugged device lets go of it a moment after
    it left the device tree, so "in use" is retried until ``deadline``."""
    while True:
        try:
            await qmp("blockdev-del", **{"node-name": node})
            return
        except HypervisorError as exc:
            if "in use" in str(exc) and time.monotonic() < deadline:
                await asyncio.sleep(DISK_POLL_S)
                continue
            logger.warning("blockdev-del %s: %s", node, exc)
            return


async def detach_disk(qmp: Qmp, serial: str, timeout: float) -> None:
    """Unplug a disk attach_disk added, within ``timeout`` (the guest must have
    unmounted it)."""
    node = f"disk-{serial}"
    await qmp("device_del", id=node)
    deadline = time.monotonic() + timeout
    while any(d["name"] == node for d in await qmp("qom-list", path="/machine/peripheral")):
        if time.monotonic() > deadline:
            raise HypervisorError("detach-disk", f"the guest did not release {node} within "
                                                 f"{timeout:g} s")
        await asyncio.sleep(DISK_POLL_S)
    await drop_node(qmp, node, deadline)
