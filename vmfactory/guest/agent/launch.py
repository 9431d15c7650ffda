"""Starting container processes: the forked side (no asyncio, no gRPC here).

    launcher ─fork─> monitor ─fork─> init (PID 1 of new namespaces) ─fork─> process
    launcher ─fork─> monitor (joins a container's namespaces) ─fork─> process

The launcher is a small process the agent forks at start, before it imports
gRPC; the agent sends it each plan with its fds over a socket.  Forking the
agent itself would copy a large process, and under TCG every fork and every
copy-on-write fault of a large Python heap is slow (measured: ~500 ms from
create to a ready root when forking the agent).

The monitor stays in the agent's PID namespace and reports on a status pipe:
``P <pid>`` once its child runs, then ``X <exit code>``; a container's init adds
``R`` once the container's root is in place.  The init is ours, not
the container's program, because the kernel drops every signal sent to a PID
namespace's init that has no handler: init forwards signals to the program and
reaps orphans.  A process that cannot be executed writes why on a close-on-exec
pipe, so the agent learns of a failed exec (EOF alone means it succeeded).
Every function here ends in ``os._exit``: a forked copy of the agent must never
return into the agent's event loop.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import sys
import termios
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from vmfactory.guest.agent import confine, linux

EXIT_SETUP_FAILED = 125
EXIT_EXEC_FAILED = 127
UNFORWARDED = {signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD}


@dataclass
class ProcessPlan:
    """What to run and how (from the Process message)."""

    args: list[str]
    env: dict[str, str]
    cwd: str = "/"
    uid: int = 0
    gid: int = 0
    groups: list[int] = field(default_factory=list)
    terminal: bool = False
    rlimits: list[list[Any]] = field(default_factory=list)  # [name, soft, hard]
    capabilities: dict[str, list[str]] | None = None       # None: every capability
    no_new_privileges: bool = False
    oom_score_adj: int | None = None


@dataclass
class LaunchPlan:
    """Everything the forked side needs; fds are the child ends of the agent's pipes."""

    process: ProcessPlan
    stdin: int
    stdout: int
    stderr: int
    status_fd: int
    exec_err_fd: int
    root: str = ""          # init: the container's root (an overlay mount)
    hostname: str = ""
    start_fd: int = -1      # init: run the process after one byte arrives here
    join_pid: int = 0       # exec: the guest PID of the container's init
    # init: the bundle's mounts (None: /proc, /dev and /dev/shm), paths, sysctls
    mounts: list[dict[str, Any]] | None = None
    masked_paths: list[str] = field(default_factory=list)
    readonly_paths: list[str] = field(default_factory=list)
    sysctl: dict[str, str] = field(default_factory=dict)
    cgroup: str = ""        # the container's cgroup directory, joined by the monitor

    FD_FIELDS = ("stdin", "stdout", "stderr", "status_fd", "exec_err_fd", "start_fd")

    def to_wire(self) -> tuple[bytes, list[int]]:
        """The plan as one message: JSON, with fds replaced by indexes into a list."""
        fds: list[int] = []
        data = {"process": self.process.__dict__, "root": self.root,
                "hostname": self.hostname, "join_pid": self.join_pid, "mounts": self.mounts,
                "masked_paths": self.masked_paths, "readonly_paths": self.readonly_paths,
                "sysctl": self.sysctl, "cgroup": self.cgroup}
        for name in self.FD_FIELDS:
            fd = getattr(self, name)
            if fd < 0:
                data[name] = -1
            elif fd in fds:
                data[name] = fds.index(fd)
            else:
                data[name] = len(fds)
                fds.append(fd)
        return json.dumps(data).encode(), fds

    @classmethod
    def from_wire(cls, raw: bytes, fds: list[int]) -> LaunchPlan:
        data = json.loads(raw)
        indexes = {name: data.pop(name) for name in cls.FD_FIELDS}
        fd_values = {name: fds[i] if i >= 0 else -1 for name, i in indexes.items()}
        return cls(process=ProcessPlan(**data.pop("process")), **data, **fd_values)

    def child_fds(self) -> set[int]:
        fds = {self.stdin, self.stdout, self.stderr, self.exec_err_fd, self.start_fd}
        return {fd for fd in fds if fd >= 0}


def exit_code(status: int) -> int:
    """Shell convention: the exit status, or 128+N for death by signal N."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _write(fd: int, text: str) -> None:
    try:
        os.write(fd, text.encode(errors="replace"))
    except OSError:
        pass  # the reader is gone (agent restarted): nothing left to tell


def _report(fd: int, text: str, exc: BaseException | None = None, stage: str = "setup") -> None:
    """Why a process could not run, on its exec-error pipe: ``STAGE ERRNO TEXT``
    (stage ``exec`` when execve itself failed, else ``setup``; errno 0 when no OS
    error is behind it), read back by GuestProcess.exec_error."""
    errno = exc.errno if isinstance(exc, OSError) and exc.errno else 0
    _write(fd, f"{stage} {errno} {text}")


# What Python changed from the defaults (ignored signals survive execve), set back
# once in the launcher.  Not a loop over every signal: under TCG each call costs
# ~0.7 ms, and resetting all 64 in each monitor and process cost ~40 ms apiece.
PYTHON_SIGNALS = (signal.SIGINT, signal.SIGPIPE, signal.SIGXFSZ)


def _default_signals() -> None:
    for sig in PYTHON_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])  # the agent blocks SIGIO


def _close_other_fds(keep: set[int]) -> None:
    """Drop the agent's descriptors (other containers' pipes among them: holding a
    stdin write end would keep that container from ever seeing EOF)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the directory's own fd, closed by now


def _close(fds: set[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


MAX_PLAN_BYTES = 256 * 1024
MAX_PLAN_FDS = 8


class Launcher:
    """The agent's end of the launcher socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, plan: LaunchPlan) -> None:
        raw, fds = plan.to_wire()
        if len(raw) > MAX_PLAN_BYTES:
            raise ValueError(f"launch plan of {len(raw)} bytes is too large")
        socket.send_fds(self.sock, [raw], fds)


def serve_launcher(sock: socket.socket) -> NoReturn:
    """The launcher's loop: one monitor per plan received; exits when the agent does."""
    _default_signals()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # monitors are reaped by the kernel
    while True:
        raw, fds, _flags, _addr = socket.recv_fds(sock, MAX_PLAN_BYTES, MAX_PLAN_FDS)
        if not raw:
            os._exit(0)
        for fd in fds:  # received fds lack close-on-exec; exec must not leak them
            os.set_inheritable(fd, False)
        try:
            plan = LaunchPlan.from_wire(raw, fds)
            if os.fork() == 0:
                sock.close()
                run_monitor(plan)
        except Exception as exc:  # noqa: BLE001 - a bad plan must not end the launcher
            print(f"vmfactory-launcher: bad plan: {exc!r}", file=sys.stderr)
            _report_bad_plan(raw, fds, exc)
        _close(set(fds))


def _report_bad_plan(raw: bytes, fds: list[int], exc: Exception) -> None:
    """Tell the agent on the plan's exec-error pipe, if the plan names one."""
    try:
        index = json.loads(raw)["exec_err_fd"]
        _report(fds[index], f"launcher could not start the process: {exc!r}")
    except (ValueError, KeyError, IndexError, TypeError):
        pass  # not even that much is readable; the agent sees the pipes close


def run_monitor(plan: LaunchPlan) -> NoReturn:
    """Entry of the forked monitor."""
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the launcher's; we wait for ours
        _close_other_fds(plan.child_fds() | {plan.status_fd})
        os.setsid()
        confine.join_cgroup(plan.cgroup)  # first: everything forked from here is in it
        if plan.join_pid:
            _join_namespaces(plan.join_pid)
        else:
            linux.unshare(linux.CLONE_NEWNS | linux.CLONE_NEWPID | linux.CLONE_NEWUTS
                          | linux.CLONE_NEWIPC)
            linux.mount("none", "/", None, linux.MS_REC | linux.MS_PRIVATE)
        pid = os.fork()
        if pid == 0:
            (_run_process if plan.join_pid else _run_init)(plan)
        _close(plan.child_fds())
        _write(plan.status_fd, f"P {pid}\n")
        _, status = os.waitpid(pid, 0)
        _write(plan.status_fd, f"X {exit_code(status)}\n")
        os._exit(0)
    except BaseException as exc:  # noqa: BLE001 - report, never return to the agent
        _report(plan.exec_err_fd, f"container setup failed: {exc}", exc)
        os._exit(EXIT_SETUP_FAILED)


def _join_namespaces(pid: int) -> None:
    root_fd = os.open(f"/proc/{pid}/root", os.O_RDONLY | os.O_DIRECTORY)
    for name, flag in linux.NAMESPACES.items():  # mnt last: it changes what /proc is
        fd = os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY)
        try:
            linux.setns(fd, flag)
        finally:
            os.close(fd)
    os.fchdir(root_fd)
    os.chroot(".")
    os.close(root_fd)


def _enter_root(root: Path) -> None:
    """Make ``root`` this mount namespace's root and drop the guest's."""
    os.chdir(root)
    try:
        linux.pivot_root(".", ".")
        linux.umount(".", linux.MNT_DETACH)
    except OSError:
        # pivot_root refuses some roots (e.g. on an initramfs): runc's fallback.
        linux.mount(".", "/", None, linux.MS_MOVE)
        os.chroot(".")
    os.chdir("/")


def _run_init(plan: LaunchPlan) -> NoReturn:
    """PID 1 of the container: set up its root, wait for start, run and reap."""
    try:
        if plan.hostname:
            linux.sethostname(plan.hostname)
        root = Path(plan.root)
        confine.apply_mounts(root, confine.DEFAULT_MOUNTS if plan.mounts is None
                             else plan.mounts)
        confine.apply_sysctl(root, plan.sysctl)
        confine.mask_paths(root, plan.masked_paths, plan.readonly_paths)
        _enter_root(root)
    except BaseException as exc:  # noqa: BLE001
        _report(plan.exec_err_fd, f"container setup failed: {exc}", exc)
        os._exit(EXIT_SETUP_FAILED)
    _write(plan.status_fd, "R\n")  # root ready: the agent's create may return
    if os.read(plan.start_fd, 1) != b"\x01":
        os._exit(0)  # removed before it was started
    child = os.fork()
    if child == 0:
        _run_process(plan)
    _close(plan.child_fds())
    for sig in signal.valid_signals():
        if sig not in UNFORWARDED:
            try:
                signal.signal(sig, lambda s, _f: os.kill(child, s))
            except (OSError, ValueError):
                pass
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            os._exit(exit_code(status))


def _run_process(plan: LaunchPlan) -> NoReturn:
    """The container's program: stdio, credentials, cwd, exec."""
    spec = plan.process
    try:  # signals: the monitor's defaults (init's forwarders come after this fork)
        os.setsid()
        if spec.terminal:
            fcntl.ioctl(plan.stdin, termios.TIOCSCTTY, 0)
        for target, fd in ((0, plan.stdin), (1, plan.stdout), (2, plan.stderr)):
            os.dup2(fd, target)
        confine.limit_process(spec.rlimits, spec.oom_score_adj)
        confine.drop_bounding(spec.capabilities)
        os.setgroups(spec.groups)
        os.setgid(spec.gid)
        os.setuid(spec.uid)
        confine.set_capabilities(spec.capabilities, spec.no_new_privileges)
        os.chdir(spec.cwd)
    except BaseException as exc:  # noqa: BLE001
        _report(plan.exec_err_fd, f"process setup failed: {exc}", exc)
        os._exit(EXIT_SETUP_FAILED)
    try:
        os.execvpe(spec.args[0], spec.args, spec.env)
    except OSError as exc:
        _report(plan.exec_err_fd, f"cannot execute {spec.args[0]!r}: {exc.strerror}", exc,
                "exec")
    os._exit(EXIT_EXEC_FAILED)
