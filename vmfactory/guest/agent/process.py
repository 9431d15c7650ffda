"""A container process as the agent sees it: its stdio ends, PID and exit code.

The forked side lives in :mod:`launch`; this is the asyncio side.  Output is
read only while an IoStream is attached: until then a full pipe makes the
program wait, so no byte is lost or buffered without bound.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import struct
import termios
from collections.abc import AsyncIterator
from dataclasses import dataclass

from vmfactory.guest.agent import launch
from vmfactory.guest.agent.errors import AgentStateError, CannotExecute, ExecFailed

logger = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024
EOT = b"\x04"  # a terminal's end-of-file character (VEOF)


@dataclass
class Stdio:
    """The agent's ends (None where there is nothing to relay) and the child's."""

    stdin: int | None
    stdout: int | None
    stderr: int | None
    child: tuple[int, int, int]
    terminal: bool

    @classmethod
    def open(cls, relay: bool, terminal: bool, rows: int, cols: int) -> Stdio:
        if not relay:
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            return cls(None, None, None, (null, null, null), False)
        if terminal:
            master, slave = os.openpty()
            if rows and cols:
                set_winsize(master, rows, cols)
            return cls(master, master, None, (slave, slave, slave), True)
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        return cls(in_w, out_r, err_r, (in_r, out_w, err_w), False)

    def close_child(self) -> None:
        for fd in set(self.child):
            os.close(fd)

    def close(self) -> None:
        for fd in {self.stdin, self.stdout, self.stderr} - {None}:
            try:
                os.close(fd)  # type: ignore[arg-type]
            except OSError:
                pass  # closed when stdin got its EOF
        self.stdin = self.stdout = self.stderr = None


def set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


async def _ready(fd: int, write: bool) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, wake)
    try:
        await fut
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)


async def read_chunks(fd: int) -> AsyncIterator[bytes]:
    """Chunks from ``fd`` until EOF (EIO on a terminal whose program has gone)."""
    os.set_blocking(fd, False)
    while True:
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            await _ready(fd, write=False)
            continue
        except OSError as exc:
            if exc.errno == errno.EIO:
                return
            raise
        if not data:
            return
        yield data


async def write_all(fd: int, data: bytes) -> None:
    os.set_blocking(fd, False)
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            await _ready(fd, write=True)


class GuestProcess:
    """One started process: pid, exit code, and its stdio while it is relayed."""

    def __init__(self, container_id: str, exec_id: str, stdio: Stdio) -> None:
        self.container_id = container_id
        self.exec_id = exec_id
        self.stdio = stdio
        self.pid = 0
        self.io_attached = False
        loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[int] = loop.create_future()
        self.root_ready: asyncio.Future[None] = loop.create_future()
        self.started: asyncio.Future[None] = loop.create_future()
        self._status_task: asyncio.Task[None] | None = None
        self._exec_err = -1

    @property
    def name(self) -> str:
        return f"{self.container_id}/{self.exec_id or 'init'}"

    @property
    def exit_code(self) -> int | None:
        return self.exited.result() if self.exited.done() else None

    def launch(self, launcher: launch.Launcher, plan: launch.LaunchPlan, status_r: int,
               exec_err_r: int) -> None:
        """Have the launcher start ``plan``; its fds are the child ends, closed here
        once sent (the launcher holds copies)."""
        try:
            launcher.send(plan)
        finally:
            self._status_task = asyncio.get_running_loop().create_task(self._follow(status_r))
            self._exec_err = exec_err_r
            self._close_child_ends(plan)

    def _close_child_ends(self, plan: launch.LaunchPlan) -> None:
        for fd in {plan.status_fd, plan.exec_err_fd, plan.start_fd} - {-1}:
            os.close(fd)
        self.stdio.close_child()

    async def _follow(self, fd: int) -> None:
        buffer = b""
        async for chunk in read_chunks(fd):
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                self._status(line.decode())
        os.close(fd)
        if not self.exited.done():  # the monitor died without reporting
            self.exited.set_result(launch.EXIT_SETUP_FAILED)
        for fut in (self.root_ready, self.started):
            if not fut.done():
                fut.set_exception(AgentStateError(f"{self.name} exited during setup"))
                fut.exception()  # retrieved: nobody may be waiting for it

    def _status(self, line: str) -> None:
        kind, _, value = line.partition(" ")
        if kind == "P":
            self.pid = int(value)
            if not self.started.done():
                self.started.set_result(None)
        elif kind == "R" and not self.root_ready.done():
            self.root_ready.set_result(None)
        elif kind == "X" and not self.exited.done():
            self.exited.set_result(int(value))
            logger.info("process %s exited with %s", self.name, value)

    async def exec_error(self) -> ExecFailed | None:
        """Why the program could not run (with the errno behind it), or None once
        it has been executed."""
        parts = [chunk async for chunk in read_chunks(self._exec_err)]
        os.close(self._exec_err)
        self._exec_err = -1
        stage, number, why = (b"".join(parts).decode(errors="replace").split(" ", 2)
                              + ["", ""])[:3]
        if not why:
            return None
        cls = CannotExecute if stage == "exec" else ExecFailed
        return cls(why, errno=int(number) if number.isdigit() else 0)

    def claim_io(self) -> Stdio:
        if self.stdio.stdout is None:
            raise AgentStateError(f"{self.name} was started without stdio")
        if self.io_attached:
            raise AgentStateError(f"{self.name} already has an IoStream attached")
        self.io_attached = True
        return self.stdio

    async def feed_stdin(self, data: bytes) -> None:
        if self.stdio.stdin is None:
            raise AgentStateError(f"{self.name}: stdin is closed")
        await write_all(self.stdio.stdin, data)

    def close_stdin(self) -> None:
        fd = self.stdio.stdin
        if fd is None:
            return
        if self.stdio.terminal:
            os.write(fd, EOT)  # the terminal's EOF; the master stays open for output
            return
        self.stdio.stdin = None
        os.close(fd)

    def resize(self, rows: int, cols: int) -> None:
        if not self.stdio.terminal or self.stdio.stdin is None:
            raise AgentStateError(f"{self.name} has no terminal")
        set_winsize(self.stdio.stdin, rows, cols)

    def signal(self, sig: int) -> None:
        if self.exited.done() or not self.pid:
            raise AgentStateError(f"{self.name} is not running")
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:  # exited; its exit report is on its way
            raise AgentStateError(f"{self.name} is not running") from None

    def close(self) -> None:
        if self._status_task is not None and not self._status_task.done():
            self._status_task.cancel()
        if self._exec_err >= 0:
            os.close(self._exec_err)
            self._exec_err = -1
        self.stdio.close()
