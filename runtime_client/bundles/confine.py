"""What an OCI config says about confining the container, read and validated:
``mounts``, the process's ``rlimits``, ``capabilities``, ``noNewPrivileges`` and
``oomScoreAdj``, and ``linux.sysctl``, ``maskedPaths``, ``readonlyPaths`` and
``resources`` (memory, CPU, pids).  All of it is applied in the guest.

Mounts are translated for a VM, as engines write them (podman: /proc, /dev,
/sys, /dev/pts, /dev/mqueue, /sys/fs/cgroup, and binds of /etc/hosts,
/etc/hostname, /run/.containerenv, /dev/shm):

* kernel file systems (proc, sysfs, devpts, mqueue, cgroup) and tmpfs: made in
  the guest with the options given;
* a bind of a regular file: its content is copied into the container at create
  (at most MAX_FILE_BYTES; a later change on the host is not seen);
* a bind of ``/dev/shm`` (a host directory podman makes): a tmpfs in the guest;
* a read-only bind of a directory: a read-only disk image of it (the root's
  image builder and cache), mounted in the guest;
* a writable bind of a directory: refused, naming the mount, until a shared file
  system exists.

seccomp is not applied in the guest (as Kata's default ``disable_guest_seccomp``:
the VM is the boundary); ``linux.namespaces``, ``cgroupsPath`` and devices
rules are not needed there either.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime_client.bundles.fields import (
    Invalid, container_path, integer, object_list, opt_bool, string, string_list,
)
from vmfactory.errors import quote

MAX_MOUNTS = 64
MAX_FILE_BYTES = 1 << 20
MAX_FILES_BYTES = 2 << 20  # with the rest of the request, under gRPC's 4 MiB
MAX_PATHS = 128
MAX_SYSCTLS = 64
MAX_OPTION = 256
KERNEL_FS = frozenset({"proc", "sysfs", "devpts", "mqueue", "cgroup", "cgroup2"})
GUEST_TMPFS = frozenset({"/dev/shm"})  # host directories an engine binds; tmpfs in a VM
TMPFS_FLAGS = ("nosuid", "nodev", "noexec")
RLIMITS = frozenset({"RLIMIT_AS", "RLIMIT_CORE", "RLIMIT_CPU", "RLIMIT_DATA", "RLIMIT_FSIZE",
                     "RLIMIT_LOCKS", "RLIMIT_MEMLOCK", "RLIMIT_MSGQUEUE", "RLIMIT_NICE",
                     "RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_RSS", "RLIMIT_RTPRIO",
                     "RLIMIT_RTTIME", "RLIMIT_SIGPENDING", "RLIMIT_STACK"})
CAP_SETS = ("bounding", "effective", "permitted", "inheritable", "ambient")
CAP_RE = re.compile(r"^CAP_[A-Z_]{1,32}$")
SYSCTL_RE = re.compile(r"^[a-z0-9_-]+([./][a-z0-9_-]+)*$")
U64 = 2**64 - 1
I64 = 2**63 - 1


@dataclass(frozen=True)
class Mount:
    """One mount as the guest makes it."""

    type: str                  # proc, sysfs, devpts, mqueue, cgroup, tmpfs, file, dir
    destination: str
    options: tuple[str, ...] = ()
    data: bytes = b""          # file: its content
    mode: int = 0o644          # file: its permission bits
    source: Path | None = None  # dir: the host directory made into a read-only disk


@dataclass(frozen=True)
class Resources:
    """linux.resources the guest's cgroup applies (0: no limit)."""

    memory_limit: int = 0
    cpu_quota: int = 0
    cpu_period: int = 0
    pids_limit: int = 0


@dataclass(frozen=True)
class ProcessLimits:
    """The process-level confinement (a bundle's process, or an exec's)."""

    rlimits: tuple[tuple[str, int, int], ...] = ()    # (type, soft, hard)
    capabilities: dict[str, tuple[str, ...]] | None = None  # None: the guest's defaults
    no_new_privileges: bool = False
    oom_score_adj: int | None = None


@dataclass(frozen=True)
class Confinement:
    """The container-level confinement."""

    mounts: tuple[Mount, ...] = ()
    masked_paths: tuple[str, ...] = ()
    readonly_paths: tuple[str, ...] = ()
    sysctl: tuple[tuple[str, str], ...] = ()
    resources: Resources = field(default_factory=Resources)


def parse_process_limits(raw: dict[str, Any]) -> ProcessLimits:
    oom = raw.get("oomScoreAdj")
    return ProcessLimits(
        rlimits=_rlimits(raw.get("rlimits")), capabilities=_capabilities(raw.get("capabilities")),
        no_new_privileges=opt_bool(raw.get("noNewPrivileges"), "process.noNewPrivileges"),
        oom_score_adj=None if oom is None else integer(oom, "process.oomScoreAdj", -1000, 1000))


def _rlimits(raw: object) -> tuple[tuple[str, int, int], ...]:
    out: dict[str, tuple[str, int, int]] = {}
    for i, r in enumerate(object_list(raw, "process.rlimits", len(RLIMITS))):
        where = f"process.rlimits[{i}]"
        kind = string(r.get("type"), f"{where}.type", 32)
        if kind not in RLIMITS:
            raise Invalid(f"{where}.type: unknown resource {quote(kind)}")
        if kind in out:
            raise Invalid(f"{where}.type: {kind} is given twice")
        soft = integer(r.get("soft"), f"{where}.soft", 0, U64)
        hard = integer(r.get("hard"), f"{where}.hard", 0, U64)
        if soft > hard:
            raise Invalid(f"{where}: soft limit {soft} is above the hard limit {hard}")
        out[kind] = (kind, soft, hard)
    return tuple(out.values())


def _capabilities(raw: object) -> dict[str, tuple[str, ...]] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise Invalid("process.capabilities must be an object")
    out = {}
    for name in CAP_SETS:
        caps = string_list(raw.get(name), f"process.capabilities.{name}", 64, 40)
        for i, cap in enumerate(caps):
            if not CAP_RE.match(cap):
                raise Invalid(f"process.capabilities.{name}[{i}]: not a capability name: "
                              f"{quote(cap)}")
        out[name] = tuple(dict.fromkeys(caps))
    return out


def parse_confinement(config: dict[str, Any]) -> Confinement:
    linux = config.get("linux")
    if linux is None:
        linux = {}
    if not isinstance(linux, dict):
        raise Invalid("linux must be an object")
    return Confinement(
        mounts=_mounts(config.get("mounts")),
        masked_paths=_paths(linux.get("maskedPaths"), "linux.maskedPaths"),
        readonly_paths=_paths(linux.get("readonlyPaths"), "linux.readonlyPaths"),
        sysctl=_sysctl(linux.get("sysctl")), resources=_resources(linux.get("resources")))


def _paths(raw: object, where: str) -> tuple[str, ...]:
    return tuple(container_path(p, f"{where}[{i}]")
                 for i, p in enumerate(string_list(raw, where, MAX_PATHS)))


def _sysctl(raw: object) -> tuple[tuple[str, str], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict) or len(raw) > MAX_SYSCTLS:
        raise Invalid(f"linux.sysctl must be an object of at most {MAX_SYSCTLS} strings")
    out = []
    for key, value in raw.items():
        if not SYSCTL_RE.match(key) or len(key) > 128:
            raise Invalid(f"linux.sysctl: not a sysctl name: {quote(key)}")
        out.append((key, string(value, f"linux.sysctl[{key}]", 4096)))
    return tuple(out)


def _resources(raw: object) -> Resources:
    if raw is None:
        return Resources()
    if not isinstance(raw, dict):
        raise Invalid("linux.resources must be an object")

    def part(name: str, key: str, low: int, high: int) -> int:
        section = raw.get(name)
        if section is None:
            return 0
        if not isinstance(section, dict):
            raise Invalid(f"linux.resources.{name} must be an object")
        value = section.get(key)
        return 0 if value is None else integer(value, f"linux.resources.{name}.{key}", low, high)
    memory = part("memory", "limit", -1, I64)
    pids = part("pids", "limit", -1, I64)
    return Resources(memory_limit=max(memory, 0), cpu_quota=max(part("cpu", "quota", -1, I64), 0),
                     cpu_period=part("cpu", "period", 0, 1_000_000), pids_limit=max(pids, 0))


def _mounts(raw: object) -> tuple[Mount, ...]:
    mounts, copied = [], 0
    for i, m in enumerate(object_list(raw, "mounts", MAX_MOUNTS)):
        mount = _mount(m, f"mounts[{i}]")
        copied += len(mount.data)
        if copied > MAX_FILES_BYTES:
            raise Invalid(f"mounts: the bound files add up to more than {MAX_FILES_BYTES} bytes")
        mounts.append(mount)
    return tuple(mounts)


def _options(raw: object, where: str) -> tuple[str, ...]:
    options = string_list(raw, f"{where}.options", 64, MAX_OPTION)
    for opt in options:
        if "," in opt:
            raise Invalid(f"{where}.options: {quote(opt)} must not contain ','")
    return tuple(options)


def _mount(m: dict[str, Any], where: str) -> Mount:
    dest = container_path(m.get("destination"), f"{where}.destination")
    if dest == "/":
        raise Invalid(f"{where}: a mount on / replaces the root: use root.path")
    kind = string(m.get("type") or "", f"{where}.type", 32)
    options = _options(m.get("options"), where)
    if kind == "bind" or "bind" in options or "rbind" in options:
        return _bind(m, where, dest, options)
    if kind in KERNEL_FS or kind == "tmpfs":
        return Mount(kind, dest, options)
    raise Invalid(f"{where}: mount type {quote(kind)} on {dest} is not supported in a VM")


def _bind(m: dict[str, Any], where: str, dest: str, options: tuple[str, ...]) -> Mount:
    if dest in GUEST_TMPFS:
        return Mount("tmpfs", dest, tuple(o for o in options if o in TMPFS_FLAGS) + ("mode=1777",))
    source = string(m.get("source"), f"{where}.source")
    if not source.startswith("/"):
        raise Invalid(f"{where}.source must be an absolute path, not {quote(source)}")
    try:
        st = os.stat(source)
    except OSError as exc:
        raise Invalid(f"{where}: bind source {quote(source)}: {exc.strerror}") from None
    readonly = "ro" in options
    if stat.S_ISREG(st.st_mode):
        return Mount("file", dest, ("ro",) if readonly else (), _read_file(source, st, where),
                     stat.S_IMODE(st.st_mode))
    if stat.S_ISDIR(st.st_mode):
        if not readonly:
            raise Invalid(f"{where}: writable bind mount of directory {quote(source)} on {dest} "
                          f"is not supported in a VM (no shared file system yet): mount it ro")
        return Mount("dir", dest, ("ro",), source=Path(source))
    raise Invalid(f"{where}: bind source {quote(source)} is neither a regular file "
                  f"nor a directory")


def _read_file(source: str, st: os.stat_result, where: str) -> bytes:
    if st.st_size > MAX_FILE_BYTES:
        raise Invalid(f"{where}: bound file {quote(source)} is larger than "
                      f"{MAX_FILE_BYTES} bytes")
    try:
        with open(source, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise Invalid(f"{where}: bind source {quote(source)}: {exc.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise Invalid(f"{where}: bound file {quote(source)} is larger than "
                      f"{MAX_FILE_BYTES} bytes")
    return data
