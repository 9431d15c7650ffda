"""What ``create`` and ``exec`` do on the caller's side (standard library only):
the terminal handed to ``--console-socket``, the forked process whose pid goes
to ``--pid-file``, and the wait for it to report.

The forked process is the container's contract with the engine: it was forked
by the runtime, holds the engine's stdio (or the pty slave) and exits with the
container's (or the exec'd process's) exit code, 128+N for signal N.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import socket
import sys
import termios
import time
from pathlib import Path
# typing and dataclasses cost ~20 ms of import, a third of this command's budget:
# annotations are strings here, so typing is only needed by the type checker.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

from runtime_client.oci.state import ContainerDir, OciError, socket_path

class Refused(OciError):
    """The forked process reported why it failed (and undid what it had done)."""


CREATE_TIMEOUT_S = 600.0  # a cold TCG boot when no pool answers is slow; a warm one is ms


def write_pid_file(path: str, pid: int) -> None:
    """As runc: written whole, then renamed into place."""
    target = Path(path).absolute()
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    tmp.write_text(str(pid))
    os.replace(tmp, target)


def open_console(console_socket: str) -> int:
    """A new pty: its master goes to the engine over ``console_socket`` (SCM_RIGHTS,
    as runc sends it); the slave is returned, to become the process's stdio."""
    master, slave = os.openpty()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            with socket_path(console_socket) as address:
                s.connect(address)
            socket.send_fds(s, [os.ttyname(slave).encode()], [master])
    except OSError as exc:
        os.close(slave)
        raise OciError(f"console socket {console_socket}: {exc.strerror or exc}") from None
    finally:
        os.close(master)
    return slave


def become_terminal_owner(slave: int) -> None:
    """In the child: a session of its own with ``slave`` as controlling terminal and stdio."""
    os.setsid()
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    for fd in (0, 1, 2):
        os.dup2(slave, fd)
    if slave > 2:
        os.close(slave)


def spawn_reporting(argv: list[str], tty_slave: int | None) -> tuple[int, int]:
    """Fork and exec ``argv`` + ``--ready-fd N``; return (pid, read end of the pipe)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: nothing here may return into the caller's code
        try:
            os.close(read_end)
            if tty_slave is not None:
                become_terminal_owner(tty_slave)
            os.set_inheritable(write_end, True)
            os.chdir("/")
            os.execv(argv[0], [*argv, "--ready-fd", str(write_end)])
        except BaseException as exc:  # noqa: BLE001 - report, never unwind into the parent
            os.write(write_end, json.dumps({"error": f"cannot start: {exc}"}).encode() + b"\n")
        os._exit(127)
    os.close(write_end)
    if tty_slave is not None:
        os.close(tty_slave)
    return pid, read_end


def await_report(pid: int, read_end: int, what: str, log: Path | None,
                 timeout: float = CREATE_TIMEOUT_S) -> dict[str, Any]:
    """The child's one report line; OciError with its message, or with why there
    was none (it died, or stayed silent past ``timeout``)."""
    deadline = time.monotonic() + timeout
    data = b""
    try:
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read_end], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                raise OciError(f"{what}: no answer within {timeout:.0f} s")
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(read_end)
    try:
        report = json.loads(data) if data.strip() else None
    except ValueError:
        report = None
    if not isinstance(report, dict):
        raise OciError(f"{what}: its process exited without a word{_log_hint(log)}")
    if "error" in report:
        _reap(pid)
        raise Refused(str(report["error"])[:1000])
    return report


def _log_hint(log: Path | None) -> str:
    if log is None or not log.exists():
        return ""
    lines = log.read_text(errors="replace").strip().splitlines()
    return f" (last log line: {lines[-1][:300]})" if lines else ""


def _reap(pid: int) -> None:
    """The child reported a failure and is exiting: collect it (it is ours still)."""
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def resident_argv(cdir: ContainerDir, config: str | None, *args: str) -> list[str]:
    """``python -m runtime_client.oci.resident`` for ``cdir``: ``--bundle B`` to hold
    a container, ``--forget`` to clean up after one that was killed."""
    argv = [sys.executable, "-m", "runtime_client.oci.resident", "--root", str(cdir.root),
            "--id", cdir.id, *args]
    return argv + ["--config", config] if config else argv


def check_bundle(bundle: Path) -> dict[str, Any]:
    """The cheap checks, before anything is forked: config.json is a JSON object
    with a process and an existing root.  The resident checks the rest."""
    config = bundle / "config.json"
    try:
        spec = json.loads(config.read_text())
    except FileNotFoundError:
        raise OciError(f"{config}: no such file or directory") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise OciError(f"{config}: not a valid JSON document: {exc}") from None
    if not isinstance(spec, dict):
        raise OciError(f"{config}: not a JSON object")
    root = spec.get("root", {}).get("path") if isinstance(spec.get("root"), dict) else None
    if not isinstance(root, str) or not root:
        raise OciError(f"{config}: root.path is missing")
    if not (bundle / root).is_dir():
        raise OciError(f"rootfs ({bundle / root}) does not exist")
    process = spec.get("process")
    if not isinstance(process, dict) or not process.get("args"):
        raise OciError(f"{config}: process.args is missing or empty")
    return spec
