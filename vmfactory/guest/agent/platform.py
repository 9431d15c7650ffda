"""What the agent does to the machine it runs on, behind one small interface.

``GuestPlatform`` is the real thing inside a VM.  ``HostStandInPlatform`` lets
the same agent run as an ordinary host process for fast tests: it never changes
the host clock or RNG state, and says so in every answer.
"""

from __future__ import annotations

import fcntl
import os
import struct
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

# From <linux/random.h>: _IOW('R', 0x03, int[2]) and _IO('R', 0x07).
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207


@dataclass(frozen=True)
class ReseedResult:
    added: bool
    reseeded: bool
    entropy_avail: int


def read_uptime() -> float:
    """Seconds since the kernel started, from /proc/uptime."""
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def read_meminfo() -> dict[str, int]:
    """/proc/meminfo as {field: KiB}."""
    out: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            out[name] = int(rest.split()[0])
    return out


def read_entropy_avail() -> int:
    with open("/proc/sys/kernel/random/entropy_avail") as f:
        return int(f.read())


def read_boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def cpus_online() -> int:
    """Number of online CPUs, from the kernel's online mask (e.g. ``0-3``)."""
    with open("/sys/devices/system/cpu/online") as f:
        spec = f.read().strip()
    count = 0
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


def online_all(pattern: str, attribute: str, offline: str, online: str) -> int:
    """Write ``online`` to every ``<pattern>/<attribute>`` that reads ``offline``."""
    import glob

    count = 0
    for path in sorted(glob.glob(f"{pattern}/{attribute}")):
        try:
            with open(path) as f:
                if f.read().strip() != offline:
                    continue
            with open(path, "w") as f:
                f.write(online)
            count += 1
        except OSError:
            continue  # e.g. a memory block the kernel refuses: counted by the caller
    return count


class Platform(ABC):
    """The host/guest-specific operations of the agent."""

    name: str

    @abstractmethod
    def now_ns(self) -> int:
        """Current wall-clock time as seen by the agent's callers."""

    @abstractmethod
    def set_time(self, unix_ns: int) -> None:
        """Set the wall clock."""

    @abstractmethod
    def reseed(self, entropy: bytes, credit_bits: int) -> ReseedResult:
        """Mix ``entropy`` into the RNG and force a reseed."""

    def online_resources(self) -> tuple[int, int]:
        """Online hot-plugged CPUs and memory; return (cpus, memory blocks) onlined."""
        cpus = online_all("/sys/devices/system/cpu/cpu[0-9]*", "online", "0", "1")
        blocks = online_all("/sys/devices/system/memory/memory[0-9]*", "state", "offline",
                            "online")
        return cpus, blocks


class GuestPlatform(Platform):
    """Inside a VM, as root: the calls act on the guest kernel."""

    name = "guest"

    def now_ns(self) -> int:
        return time.clock_gettime_ns(time.CLOCK_REALTIME)

    def set_time(self, unix_ns: int) -> None:
        time.clock_settime_ns(time.CLOCK_REALTIME, unix_ns)

    def reseed(self, entropy: bytes, credit_bits: int) -> ReseedResult:
        padded = entropy + b"\0" * (-len(entropy) % 4)
        # struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
        request = struct.pack("ii", credit_bits, len(entropy)) + padded
        fd = os.open("/dev/urandom", os.O_WRONLY)
        try:
            fcntl.ioctl(fd, RNDADDENTROPY, request)
            fcntl.ioctl(fd, RNDRESEEDCRNG)
        finally:
            os.close(fd)
        return ReseedResult(added=True, reseeded=True, entropy_avail=read_entropy_avail())


class HostStandInPlatform(Platform):
    """Test stand-in on the host: simulates the clock, never touches host state."""

    name = "host-standin"

    def __init__(self) -> None:
        self._offset_ns = 0

    def now_ns(self) -> int:
        return time.time_ns() + self._offset_ns

    def set_time(self, unix_ns: int) -> None:
        self._offset_ns = unix_ns - time.time_ns()

    def online_resources(self) -> tuple[int, int]:
        return 0, 0  # never touch the host's CPUs or memory

    def reseed(self, entropy: bytes, credit_bits: int) -> ReseedResult:
        # Writing to /dev/urandom mixes bytes in without crediting or reseeding.
        with open("/dev/urandom", "wb") as f:
            f.write(entropy)
        return ReseedResult(added=True, reseeded=False, entropy_avail=read_entropy_avail())
