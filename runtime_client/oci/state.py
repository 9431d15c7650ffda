"""The state directory both halves of ``vmfactory-oci`` share (standard library only).

    ROOT/                 --root (default /run/vmfactory-oci), root's, mode 0700
      ID/                 one container
        state.json        written by its resident process, atomically
        control.sock      the resident's control socket (JSON lines)
        resident.log      the resident's log (its stdio belongs to the container)

``state.json`` holds what ``state`` prints (ociVersion, id, status, pid, bundle,
annotations, created) plus the resident's start time, so a pid reused by
another process never passes for the container.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from contextlib import contextmanager
from pathlib import Path
# typing and dataclasses cost ~20 ms of import, a third of this command's budget:
# annotations are strings here, so typing is only needed by the type checker.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

OCI_VERSION = "1.0.2-dev"
DEFAULT_ROOT = Path("/run/vmfactory-oci")
ID_RE = re.compile(r"^[\w+.-]{1,128}$", re.ASCII)
CONTROL_TIMEOUT_S = 60.0  # a start or delete round trip; the guest is slow under TCG
MAX_REPLY = 1 << 20


SUN_PATH_MAX = 107  # what a unix socket address holds, without its NUL


class OciError(Exception):
    """A failed command: its message is the one line the caller sees."""


@contextmanager
def socket_path(path: Path | str) -> Iterator[str]:
    """An address to bind or connect a unix socket at ``path``: itself, or when it
    is too long (engines' roots and 64-character ids easily are) the same file
    through a descriptor of its directory, /proc/self/fd/N/NAME."""
    text = str(path)
    if len(os.fsencode(text)) <= SUN_PATH_MAX:
        yield text
        return
    directory, _, name = text.rpartition("/")
    fd = os.open(directory or "/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)


def check_id(container_id: str) -> str:
    if not ID_RE.match(container_id):
        raise OciError(f"invalid container id format: {container_id[:100]!r}")
    return container_id


def process_start_time(pid: int) -> int:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat); 0 if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0
    fields = stat[stat.rfind(b")") + 2:].split()
    if fields[0] == b"Z":
        return 0  # a zombie has exited: only its exit code remains
    return int(fields[19])


class ContainerDir:
    """One container's directory under the runtime's --root."""

    __slots__ = ("root", "id")

    def __init__(self, root: Path, id: str) -> None:
        self.root = root
        self.id = id

    @property
    def path(self) -> Path:
        return self.root / self.id

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    @property
    def control(self) -> Path:
        return self.path / "control.sock"

    @property
    def log(self) -> Path:
        return self.path / "resident.log"

    def exists(self) -> bool:
        return self.path.is_dir()

    def claim(self) -> None:
        """Make the directory; an id in use is runc's error."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            self.path.mkdir(mode=0o700)
        except FileExistsError:
            raise OciError(f"container with id exists: {self.id}") from None

    def load(self) -> dict[str, Any]:
        """The recorded state with the status as it is now."""
        try:
            state: dict[str, Any] = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            if self.exists() and (self.log.exists() or _young(self.path)):
                # claimed, its resident not yet reporting: still creating
                return {"ociVersion": OCI_VERSION, "id": self.id, "status": "creating",
                        "pid": 0, "bundle": ""}
            raise OciError("container does not exist") from None
        except (OSError, ValueError) as exc:
            raise OciError(f"container {self.id}: unreadable state: {exc}") from None
        if state.get("status") != "stopped" and not self.resident_alive(state):
            state["status"] = "stopped"
            state["died"] = True  # killed before it could give its VM back
        return state

    def save(self, state: dict[str, Any]) -> None:
        tmp = self.path / ".state.json.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.state_file)

    @staticmethod
    def resident_alive(state: dict[str, Any]) -> bool:
        pid = int(state.get("pid") or 0)
        started = process_start_time(pid) if pid > 0 else 0
        return started != 0 and started == state.get("pid_start")  # 0: gone, or a zombie

    def request(self, op: str, timeout: float = CONTROL_TIMEOUT_S,
                **fields: Any) -> dict[str, Any]:
        """One request to the resident; its reply, or OciError with its message."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            try:
                with socket_path(self.control) as address:
                    s.connect(address)
                s.sendall(json.dumps({"op": op, **fields}).encode() + b"\n")
                reply = _read_line(s)
            except socket.timeout:
                raise OciError(f"container {self.id}: no answer to {op} within "
                               f"{timeout:.0f} s") from None
            except OSError as exc:
                raise OciError(f"container {self.id}: its process does not answer "
                               f"({exc.strerror or exc})") from None
        if not reply.get("ok"):
            raise OciError(str(reply.get("error", f"{op} failed"))[:1000])
        return reply


def _young(path: Path, seconds: float = 5.0) -> bool:
    """Made moments ago (a create that has not forked its resident yet)."""
    try:
        return time.time() - path.stat().st_mtime < seconds
    except OSError:
        return False


def _read_line(s: socket.socket) -> dict[str, Any]:
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REPLY:
            raise OSError("reply too long")
    try:
        reply = json.loads(data or b"{}")
    except ValueError:
        raise OSError("malformed reply") from None
    if not isinstance(reply, dict):
        raise OSError("malformed reply")
    return reply


def public_state(state: dict[str, Any]) -> dict[str, Any]:
    """What ``state`` prints: the runtime spec's fields (and ``created``, as runc)."""
    keys = ("ociVersion", "id", "status", "pid", "bundle", "annotations", "created")
    out = {k: state[k] for k in keys if k in state}
    if out.get("status") == "stopped":
        out["pid"] = 0
    return out
