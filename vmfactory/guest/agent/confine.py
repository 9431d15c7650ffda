"""Confining a container's processes, on the forked side (no asyncio here): the
bundle's mounts, masked and read-only paths and sysctls (in the init, before
its root is entered), and each process's rlimits, OOM score, capabilities and
no_new_privs (just before its execve).

Mount options are runc's: the flag words below become mount flags, ``ro``
on a bind needs a second, remounting call, and every other word goes to the
file system as data (``mode=755``, ``size=65536k``, ``newinstance``...).
"""

from __future__ import annotations

import os
import resource
from pathlib import Path
from typing import Any

from vmfactory.guest.agent import linux

FLAGS = {"ro": linux.MS_RDONLY, "nosuid": linux.MS_NOSUID, "nodev": linux.MS_NODEV,
         "noexec": linux.MS_NOEXEC, "sync": linux.MS_SYNCHRONOUS, "dirsync": linux.MS_DIRSYNC,
         "noatime": linux.MS_NOATIME, "nodiratime": linux.MS_NODIRATIME,
         "relatime": linux.MS_RELATIME, "strictatime": linux.MS_STRICTATIME,
         "mand": linux.MS_MANDLOCK}
CLEARED = {"rw", "suid", "dev", "exec", "async", "atime", "diratime", "norelatime",
           "nostrictatime", "nomand", "defaults"}
PROPAGATION = {"private", "rprivate", "shared", "rshared", "slave", "rslave",
               "unbindable", "runbindable", "bind", "rbind"}
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"),
             ("ptmx", "pts/ptmx"))
CAPS = ("CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP "
        "LINUX_IMMUTABLE NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER "
        "SYS_MODULE SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE "
        "SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP "
        "MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF "
        "CHECKPOINT_RESTORE").split()
CAP_NUMBERS = {f"CAP_{name}": i for i, name in enumerate(CAPS)}
# Without a bundle's mounts (vmfactory-runtime's own bundles): what a process expects.
DEFAULT_MOUNTS: list[dict[str, Any]] = [
    {"type": "proc", "destination": "/proc", "options": ["nosuid", "nodev", "noexec"]},
    {"type": "tmpfs", "destination": "/dev", "options": ["nosuid", "mode=755", "size=1024k"]},
    {"type": "tmpfs", "destination": "/dev/shm", "options": ["nosuid", "nodev", "mode=1777"]},
]
FSTYPES = {"proc": "proc", "sysfs": "sysfs", "devpts": "devpts", "mqueue": "mqueue",
           "cgroup": "cgroup2", "cgroup2": "cgroup2", "tmpfs": "tmpfs"}


def mount_flags(options: list[str]) -> tuple[int, str]:
    """(flags, data) for ``options``."""
    flags, data = 0, []
    for opt in options:
        if opt in FLAGS:
            flags |= FLAGS[opt]
        elif opt in CLEARED or opt in PROPAGATION:
            continue
        else:
            data.append(opt)
    return flags, ",".join(data)


def _target(root: Path, destination: str, is_file: bool) -> Path:
    """``destination`` under ``root``, made if missing.  A symlink on the way is
    refused (the image must not redirect a mount out of its root); one as the
    last component (an image's /etc/resolv.conf, say) is replaced by the mount
    point: the root's upper layer is the container's own."""
    path = root
    parts = [p for p in destination.split("/") if p]
    for i, part in enumerate(parts):
        path = path / part
        last = i == len(parts) - 1
        if path.is_symlink():
            if not last:
                raise OSError(40, f"mount destination {destination}: {path} is a symlink")
            path.unlink()
        if last and is_file:
            if not path.exists():
                path.touch(mode=0o644)
        else:
            path.mkdir(exist_ok=True)
    return path


def apply_mounts(root: Path, mounts: list[dict[str, Any]]) -> None:
    """The bundle's mounts in their order; a tmpfs /dev gets the default nodes."""
    for m in mounts:
        kind, dest = m["type"], m["destination"]
        flags, data = mount_flags(m["options"])
        if kind == "bind":  # a staged file or a mounted disk, from the agent
            target = _target(root, dest, os.path.isfile(m["source"]))
            linux.mount(m["source"], str(target), None, linux.MS_BIND)
            if flags & linux.MS_RDONLY:
                linux.mount("none", str(target), None,
                            linux.MS_BIND | linux.MS_REMOUNT | flags)
            continue
        target = _target(root, dest, False)
        linux.mount(kind if kind != "cgroup" else "cgroup2", str(target), FSTYPES[kind],
                    flags, data or None)
        if kind == "tmpfs" and dest == "/dev":
            _dev_nodes(target)


def _dev_nodes(dev: Path) -> None:
    for node in DEV_NODES:
        (dev / node).touch()
        linux.mount(f"/dev/{node}", str(dev / node), None, linux.MS_BIND)
    for name, target in DEV_LINKS:
        if not (dev / name).exists():
            (dev / name).symlink_to(target)


def mask_paths(root: Path, masked: list[str], readonly: list[str]) -> None:
    """Masked: /dev/null over a file, an empty read-only tmpfs over a directory;
    read-only: bound onto itself, read-only.  A path that does not exist is skipped."""
    for path in masked:
        target = root / path.lstrip("/")
        if target.is_symlink() or not target.exists():
            continue
        if target.is_dir():
            linux.mount("tmpfs", str(target), "tmpfs", linux.MS_RDONLY, "size=0")
        else:
            linux.mount("/dev/null", str(target), None, linux.MS_BIND)
    for path in readonly:
        target = root / path.lstrip("/")
        if target.is_symlink() or not target.exists():
            continue
        linux.mount(str(target), str(target), None, linux.MS_BIND | linux.MS_REC)
        linux.mount("none", str(target), None,
                    linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY | linux.MS_REC)


def apply_sysctl(root: Path, sysctl: dict[str, str]) -> None:
    """Written through the container's /proc (its own UTS and IPC namespaces)."""
    for key, value in sysctl.items():
        path = root / "proc/sys" / key.replace(".", "/")
        with open(path, "w") as f:
            f.write(value)


def join_cgroup(path: str) -> None:
    if path:
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write("0")


def limit_process(rlimits: list[list[Any]], oom_score_adj: int | None) -> None:
    for kind, soft, hard in rlimits:
        number = getattr(resource, kind)
        resource.setrlimit(number, (_rlim(soft), _rlim(hard)))
    if oom_score_adj is not None:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(oom_score_adj))


def _rlim(value: int) -> int:
    return resource.RLIM_INFINITY if value >= 2**63 else value


def drop_bounding(caps: dict[str, list[str]] | None) -> None:
    """Before the uid changes (dropping needs CAP_SETPCAP); keep the rest across it."""
    if caps is None:
        return
    keep = _mask(caps["bounding"])
    for number in range(linux.last_cap() + 1):
        if not keep >> number & 1:
            linux.prctl(linux.PR_CAPBSET_DROP, number)
    linux.prctl(linux.PR_SET_KEEPCAPS, 1)


def set_capabilities(caps: dict[str, list[str]] | None, no_new_privileges: bool) -> None:
    """After the uid changed: the effective, permitted, inheritable and ambient sets."""
    if caps is not None:
        linux.capset(_mask(caps["effective"]), _mask(caps["permitted"]),
                     _mask(caps["inheritable"]))
        for name in caps["ambient"]:
            number = CAP_NUMBERS.get(name)
            if number is not None and number <= linux.last_cap():
                linux.prctl(linux.PR_CAP_AMBIENT, linux.PR_CAP_AMBIENT_RAISE, number)
    if no_new_privileges:
        linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)


def _mask(names: list[str]) -> int:
    """Unknown names (a newer runtime's) are ignored, as runc does."""
    last = linux.last_cap()
    mask = 0
    for name in names:
        number = CAP_NUMBERS.get(name)
        if number is not None and number <= last:
            mask |= 1 << number
    return mask
