"""``vmfactory-oci exec`` (standard library only).

The exec'd process runs in the guest; on the host, the process that represents it
is this command itself (or, with ``--detach``, a child it forks, whose pid goes
to ``--pid-file``).  That process hands its stdio descriptors to the container's
resident over the control socket (SCM_RIGHTS), which relays them to the guest;
it forwards the signals it receives and terminal resizes, and exits with the
exec'd process's exit code.  So nothing heavy is imported or connected per exec.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import socket
import struct
import termios
from pathlib import Path
# typing and dataclasses cost ~20 ms of import, a third of this command's budget:
# annotations are strings here, so typing is only needed by the type checker.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

from runtime_client.oci.frontend import (
    await_report, become_terminal_owner, open_console, write_pid_file,
)
from runtime_client.oci.state import ContainerDir, OciError, check_id, socket_path

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2)
LOST = 255  # the resident went away: the exit code is unknown
MAX_LINE = 1 << 16


def add_parser(sub: Any) -> None:
    e = sub.add_parser("exec")
    e.add_argument("--process", "-p", default="")
    e.add_argument("--pid-file", default="")
    e.add_argument("--detach", "-d", action="store_true")
    e.add_argument("--tty", "-t", action="store_true")
    e.add_argument("--console-socket", default="")
    e.add_argument("--cwd", default="")
    e.add_argument("--env", "-e", action="append", default=[])
    e.add_argument("--user", "-u", default="")
    e.add_argument("--additional-gids", "-g", action="append", default=[])
    for flag in ("--no-new-privs",):
        e.add_argument(flag, action="store_true")
    for flag in ("--cap", "--apparmor", "--process-label", "--cgroup", "--preserve-fds"):
        e.add_argument(flag, action="append", default=[])
    e.add_argument("id")
    e.add_argument("argv", nargs=argparse.REMAINDER)


def process_of(args: argparse.Namespace) -> dict[str, Any]:
    """The process to exec: ``--process FILE`` (an OCI process object), or the
    command line with --cwd/--env/--user/--tty."""
    if args.process:
        try:
            process = json.loads(Path(args.process).read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise OciError(f"process {args.process}: {exc}") from None
        if not isinstance(process, dict) or not process.get("args"):
            raise OciError(f"process {args.process}: args must not be empty")
        return process
    command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not command:
        raise OciError("exec needs a command or --process")
    process: dict[str, Any] = {"args": command, "terminal": args.tty}
    if args.cwd:
        process["cwd"] = args.cwd
    if args.env:
        process["env"] = args.env
    if args.user:
        uid, _, gid = args.user.partition(":")
        try:
            process["user"] = {"uid": int(uid), "gid": int(gid or 0),
                               "additionalGids": [int(g) for g in args.additional_gids]}
        except ValueError:
            raise OciError(f"--user {args.user[:40]!r}: uid[:gid] must be numbers") from None
    return process


def cmd_exec(args: argparse.Namespace) -> int:
    cdir = ContainerDir(args.root, check_id(args.id))
    if cdir.load()["status"] != "running":
        raise OciError("cannot exec in a stopped container")
    process = process_of(args)
    terminal = bool(process.get("terminal"))
    if args.detach and terminal and not args.console_socket:
        raise OciError("cannot allocate tty if runc will detach without setting console socket")
    slave = open_console(args.console_socket) if args.console_socket and terminal else None
    if not args.detach:
        if slave is not None:
            become_terminal_owner(slave)
        if args.pid_file:
            write_pid_file(args.pid_file, os.getpid())
        return relay(cdir, process, ready_fd=None)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        code = LOST
        try:
            if slave is not None:
                become_terminal_owner(slave)
            code = relay(cdir, process, ready_fd=write_end)
        except OciError as exc:
            os.write(write_end, json.dumps({"error": str(exc)}).encode() + b"\n")
        finally:
            os._exit(code)
    os.close(write_end)
    if slave is not None:
        os.close(slave)
    await_report(pid, read_end, f"exec in {cdir.id}", None)
    if args.pid_file:
        write_pid_file(args.pid_file, pid)
    return 0


def relay(cdir: ContainerDir, process: dict[str, Any], ready_fd: int | None) -> int:
    """Hand stdio to the resident, report once the process runs, forward signals
    and resizes, return its exit code."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with socket_path(cdir.control) as address:
            s.connect(address)
    except OSError as exc:
        raise OciError(f"container {cdir.id}: its process does not answer "
                       f"({exc.strerror or exc})") from None
    request = json.dumps({"op": "exec", "process": process}).encode() + b"\n"
    socket.send_fds(s, [request], [0, 1, 2])
    reader = s.makefile("rb")
    first = _line(reader)
    if not first.get("ok"):
        raise OciError(str(first.get("error", "exec failed"))[:1000])
    if ready_fd is not None:
        os.write(ready_fd, b'{"ok": true}\n')
        os.close(ready_fd)
    _forward_signals(s, terminal=bool(process.get("terminal")))
    try:
        last = _line(reader)
    except OSError:
        return LOST
    code = last.get("exit_code")
    return int(code) if isinstance(code, int) else LOST


def _line(reader: Any) -> dict[str, Any]:
    line = reader.readline(MAX_LINE)
    if not line:
        return {"error": "the container's process went away"}
    try:
        message = json.loads(line)
    except ValueError:
        return {}
    return message if isinstance(message, dict) else {}


def _forward_signals(s: socket.socket, terminal: bool) -> None:
    def send(message: dict[str, Any]) -> None:
        try:
            s.sendall(json.dumps(message).encode() + b"\n")
        except OSError:
            pass  # the resident is gone: the exit code read says so

    def on_signal(signum: int, frame: object) -> None:
        if signum == signal.SIGWINCH:
            rows, cols = _size()
            if rows:
                send({"resize": [rows, cols]})
        else:
            send({"signal": signum})
    for signum in FORWARDED:
        signal.signal(signum, on_signal)
    if terminal:
        signal.signal(signal.SIGWINCH, on_signal)
        on_signal(signal.SIGWINCH, None)


def _size() -> tuple[int, int]:
    for fd in (0, 1):
        try:
            rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ,
                                                                  b"\0" * 8))
            return rows, cols
        except OSError:
            continue
    return 0, 0


__all__ = ["add_parser", "cmd_exec", "process_of", "relay"]
