"""A bundle's confinement as CreateContainer carries it, validated and made
ready by the agent before the container's init is launched: bound files written
under the container's work directory, read-only disks mounted there, a cgroup
holding the resources' limits.  What is left for the forked side
(``launch``/``confine``) is a plan of plain mounts, paths and sysctls.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from vmfactory.guest.agent import linux
from vmfactory.guest.agent.errors import BadRequest, ExecFailed
from vmfactory.proto import agent_pb2 as pb

logger = logging.getLogger(__name__)

MAX_MOUNTS = 64
MAX_FILE_BYTES = 1 << 20
MAX_PATHS = 128
MAX_SYSCTLS = 64
MAX_PATH = 4096
TYPES = frozenset({"proc", "sysfs", "devpts", "mqueue", "cgroup", "cgroup2", "tmpfs", "file",
                   "disk"})
SYSCTL_RE = re.compile(r"^[a-z0-9_-]+([./][a-z0-9_-]+)*$")
SERIAL_RE = re.compile(r"^[A-Za-z0-9_-]{1,20}$")
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PARENT = CGROUP_ROOT / "vmfactory"
CGROUP_RMDIR_TRIES = 50
CGROUP_RMDIR_WAIT_S = 0.02


class Staged(Protocol):
    """The container being made (containers.Container)."""

    id: str
    workdir: Path

    def mount_disk(self, device: Path, target: Path) -> None: ...


@dataclass
class Setup:
    """What the forked side needs besides the process (see LaunchPlan)."""

    mounts: list[dict[str, Any]] | None = None
    masked_paths: list[str] = field(default_factory=list)
    readonly_paths: list[str] = field(default_factory=list)
    sysctl: dict[str, str] = field(default_factory=dict)
    resources: pb.Resources | None = None
    cgroup: str = ""


def _path(value: str, where: str) -> str:
    if (not value.startswith("/") or "\0" in value or len(value) > MAX_PATH
            or ".." in value.split("/")):
        raise BadRequest(f"{where}: not an absolute path inside the container: {value[:100]!r}")
    return os.path.normpath(value)


def _mount(m: pb.Mount, i: int) -> dict[str, Any]:
    where = f"mounts[{i}]"
    if m.type not in TYPES:
        raise BadRequest(f"{where}: unknown type {m.type[:40]!r}")
    dest = _path(m.destination, f"{where}.destination")
    if dest == "/":
        raise BadRequest(f"{where}: a mount on / is not allowed")
    if any("," in o or "\0" in o or len(o) > 256 for o in m.options) or len(m.options) > 64:
        raise BadRequest(f"{where}: bad options")
    if len(m.data) > MAX_FILE_BYTES:
        raise BadRequest(f"{where}: file of {len(m.data)} bytes is too large")
    if m.type == "disk" and not SERIAL_RE.match(m.disk_serial):
        raise BadRequest(f"{where}: bad disk serial {m.disk_serial[:40]!r}")
    return {"type": m.type, "destination": dest, "options": list(m.options), "data": m.data,
            "mode": m.mode & 0o7777, "serial": m.disk_serial}


def setup_of(request: pb.CreateContainerRequest) -> Setup:
    """The request's confinement, validated (BadRequest naming the field)."""
    if len(request.mounts) > MAX_MOUNTS or len(request.masked_paths) > MAX_PATHS \
            or len(request.readonly_paths) > MAX_PATHS or len(request.sysctl) > MAX_SYSCTLS:
        raise BadRequest("too many mounts, paths or sysctls")
    for key, value in request.sysctl.items():
        if not SYSCTL_RE.match(key) or len(key) > 128 or len(value) > 4096 or "\0" in value:
            raise BadRequest(f"sysctl {key[:100]!r}: bad name or value")
    r = request.resources if request.HasField("resources") else None
    if r is not None and min(r.memory_limit, r.cpu_quota, r.pids_limit) < 0:
        raise BadRequest("resources: limits must not be negative")
    return Setup(
        mounts=[_mount(m, i) for i, m in enumerate(request.mounts)] if request.oci_mounts
        else None,
        masked_paths=[_path(p, "masked_paths") for p in request.masked_paths],
        readonly_paths=[_path(p, "readonly_paths") for p in request.readonly_paths],
        sysctl=dict(request.sysctl), resources=r)


async def stage(container: Staged, setup: Setup,
                wait_disk: Callable[[str], Awaitable[Path]]) -> None:
    """Turn file and disk mounts into binds of what the agent made; make the cgroup."""
    if setup.mounts is not None:
        files = container.workdir / "files"
        for i, m in enumerate(setup.mounts):
            if m["type"] == "file":
                files.mkdir(exist_ok=True)
                path = files / str(i)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, m["mode"] or 0o644)
                with os.fdopen(fd, "wb") as f:
                    f.write(m["data"])
                m.update(type="bind", source=str(path))
            elif m["type"] == "disk":
                device = await wait_disk(m["serial"])
                target = container.workdir / f"disk-{i}"
                target.mkdir()
                container.mount_disk(device, target)
                m.update(type="bind", source=str(target))
            m.pop("data")
    if setup.resources is not None:
        setup.cgroup = str(make_cgroup(container.id, setup.resources))


def _enable_controllers(directory: Path) -> None:
    wanted = {"memory", "cpu", "pids"}
    available = set((directory / "cgroup.controllers").read_text().split())
    for name in sorted(wanted & available):
        try:
            (directory / "cgroup.subtree_control").write_text(f"+{name}")
        except OSError as exc:  # e.g. a controller the kernel keeps elsewhere
            logger.warning("cgroup %s: cannot enable %s: %s", directory, name, exc)


def make_cgroup(container_id: str, r: pb.Resources) -> Path:
    """``/sys/fs/cgroup/vmfactory/<id>`` with the limits written (cgroup v2)."""
    try:
        if not (CGROUP_ROOT / "cgroup.controllers").exists():
            linux.mount("cgroup2", str(CGROUP_ROOT), "cgroup2",
                        linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
        CGROUP_PARENT.mkdir(exist_ok=True)
        _enable_controllers(CGROUP_ROOT)
        _enable_controllers(CGROUP_PARENT)
        group = CGROUP_PARENT / container_id
        group.mkdir()
        if r.memory_limit:
            (group / "memory.max").write_text(str(r.memory_limit))
        if r.cpu_quota:
            (group / "cpu.max").write_text(f"{r.cpu_quota} {r.cpu_period or 100000}")
        if r.pids_limit:
            (group / "pids.max").write_text(str(r.pids_limit))
    except OSError as exc:
        raise ExecFailed(f"container {container_id}: cgroup: {exc}") from exc
    return group


async def remove_cgroup(path: str) -> None:
    """Once its processes are gone (the last monitor exits just after the init)."""
    if not path:
        return
    for _ in range(CGROUP_RMDIR_TRIES):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            await asyncio.sleep(CGROUP_RMDIR_WAIT_S)
    logger.warning("cgroup %s: still busy, left behind", path)
