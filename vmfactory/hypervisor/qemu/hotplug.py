"""Hot-plug over QMP: vCPUs, memory DIMMs, and disks on the PCIe root ports."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from vmfactory.errors import HypervisorError, ResourceExhausted
from vmfactory.hypervisor.base import SERIAL_RE, DiskImage
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


@dataclass(frozen=True)
class PluggedDisk:
    """What a hot-plugged disk left in QEMU: its block node and its fd set."""

    node: str
    fdset: int


async def attach_disk(qmp: Qmp, send_fd: Callable[[int], None], disk: DiskImage,
                      serial: str) -> PluggedDisk:
    """Hot-plug ``disk`` as a virtio-blk disk the guest finds by ``serial``.  QEMU
    gets the open descriptor (``add-fd``), never a path it would resolve itself.
    The caller serializes attaches (a passed fd goes to the next add-fd)."""
    if not SERIAL_RE.match(serial):
        raise HypervisorError("attach-disk", f"serial {serial!r} must match {SERIAL_RE.pattern}")
    send_fd(disk.fd)
    fdset = (await qmp("add-fd", opaque=f"disk {serial}"))["fdset-id"]
    node = f"disk-{serial}"
    try:
        await qmp("blockdev-add", **{
            "node-name": node, "driver": "raw", "read-only": not disk.writable,
            "file": {"driver": "file", "filename": f"/dev/fdset/{fdset}",
                     "read-only": not disk.writable}})
    except BaseException:
        await finish(_drop_fdset(qmp, fdset))
        raise
    try:
        await _plug_disk(qmp, node, serial)
    except BaseException:
        await finish(_drop(qmp, PluggedDisk(node, fdset)))
        raise
    return PluggedDisk(node, fdset)


async def plugged_disks(qmp: Qmp) -> dict[str, PluggedDisk]:
    """The disks attach_disk left in a running QEMU, by serial (a VM adopted after
    a daemon restart keeps its lessee's disks, and must still be able to drop them)."""
    found = {}
    for node in await qmp("query-named-block-nodes"):
        name, filename = node.get("node-name", ""), node.get("file", "")
        if name.startswith("disk-"):
            fdset = filename.rsplit("/", 1)[1] if filename.startswith("/dev/fdset/") else ""
            found[name[len("disk-"):]] = PluggedDisk(name, int(fdset) if fdset.isdigit() else -1)
    return found


async def _drop(qmp: Qmp, disk: PluggedDisk, deadline: float = 0.0) -> None:
    await drop_node(qmp, disk.node, deadline)
    await _drop_fdset(qmp, disk.fdset)


async def _drop_fdset(qmp: Qmp, fdset: int) -> None:
    if fdset < 0:
        return  # not found when the disk was rediscovered: QEMU drops it with its node
    try:
        await qmp("remove-fd", **{"fdset-id": fdset})
    except HypervisorError as exc:
        logger.warning("remove-fd %d: %s", fdset, exc)


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
    raise ResourceExhausted(f"all {DISK_PORTS} disk ports of the VM are in use")


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


async def detach_disk(qmp: Qmp, disk: PluggedDisk, timeout: float) -> None:
    """Unplug a disk attach_disk added, within ``timeout`` (the guest must have
    unmounted it), then let go of its node and descriptor."""
    await qmp("device_del", id=disk.node)
    deadline = time.monotonic() + timeout
    while any(d["name"] == disk.node
              for d in await qmp("qom-list", path="/machine/peripheral")):
        if time.monotonic() > deadline:
            raise HypervisorError("detach-disk", f"the guest did not release {disk.node} "
                                                 f"within {timeout:g} s")
        await asyncio.sleep(DISK_POLL_S)
    await _drop(qmp, disk, deadline)
