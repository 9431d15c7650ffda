"""Who asks: the identity of a request's caller, and what it may touch.

A caller is known by the credentials of its connection to the daemon's unix
socket (``SO_PEERCRED``: uid, gid, pid, read by ``server.peers``) and the
supplementary groups of that process.  Root may do anything; any other uid
only what it owns.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass, field

from vmfactory.errors import PermissionDenied, quote


def process_groups(pid: int, uid: int, gid: int) -> frozenset[int]:
    """The supplementary groups of process ``pid`` (as it runs now), else of ``uid``."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:]) | {gid}
    except (OSError, ValueError):
        pass
    try:
        return frozenset(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    except KeyError:
        return frozenset({gid})


@dataclass(frozen=True)
class Caller:
    """One connection's identity.  ``via``: ``unix`` (peer credentials), ``tcp``
    (the token file's holder, treated as root) or ``local`` (this process)."""

    uid: int
    gid: int
    pid: int
    groups: frozenset[int] = field(default_factory=frozenset)
    via: str = "unix"

    @classmethod
    def of_process(cls, pid: int, uid: int, gid: int, via: str = "unix") -> Caller:
        return cls(uid, gid, pid, process_groups(pid, uid, gid), via)

    @classmethod
    def local(cls) -> Caller:
        """This process itself (the demo, tests driving the core directly)."""
        return cls.of_process(os.getpid(), os.getuid(), os.getgid(), "local")

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    def __str__(self) -> str:
        return f"uid {self.uid} (pid {self.pid}, {self.via})"

    def owns(self, uid: int) -> bool:
        """Whether this caller may act on something ``uid`` owns."""
        return self.is_root or self.uid == uid

    def require_root(self, what: str) -> None:
        if not self.is_root:
            raise PermissionDenied(f"{what} is for root only, not {self}")

    def in_group(self, name: str) -> bool:
        """Whether the caller belongs to the unix group ``name`` (root always does)."""
        if self.is_root:
            return True
        try:
            return grp.getgrnam(name).gr_gid in self.groups
        except KeyError:
            return False

    def require_group(self, name: str) -> None:
        if not self.in_group(name):
            raise PermissionDenied(f"{self} is not in the group of tenant {quote(name)}")
