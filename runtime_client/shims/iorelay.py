"""Relays one container process's stdio between host file descriptors and the
guest agent's ``IoStream``: the I/O half of Kata's ``katashim`` /
``katashimbuiltin``.

Host stdin may be a pipe, a regular file, a terminal or /dev/null, so it is read
by a daemon thread: a blocked ``read`` on a terminal must not keep the
interpreter from exiting (``asyncio.to_thread`` would), and regular files are
always "readable" to ``add_reader``.  Output is written with blocking
``os.write`` loops in the event loop's thread, which keeps stdout/stderr in the
order the agent sent them and pushes back on the stream when the host reader is
slow.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import select
import termios
import threading
import tty
from collections.abc import AsyncIterator, Callable

from vmfactory.agent.client import AgentClient
from vmfactory.errors import AgentError
from vmfactory.proto import agent_pb2 as pb

logger = logging.getLogger(__name__)

CHUNK_SIZE = 64 * 1024
# Chunks read from host stdin but not yet sent: bounds memory when the process
# reads its stdin more slowly than the host produces it.
STDIN_BACKLOG = 16
# How often a stdin reader blocked on backpressure checks whether to give up.
_STOP_POLL_S = 0.1

# Marks the end of host stdin in the queue (EOF or a read error).
_EOF = b""


def host_terminal_size(*fds: int | None) -> os.terminal_size | None:
    """The size of the first of ``fds`` that is a terminal, or None."""
    for fd in fds:
        if fd is None:
            continue
        try:
            if os.isatty(fd):
                return os.get_terminal_size(fd)
        except OSError:
            continue
    return None


async def relay_io(conn: AgentClient, container_id: str, exec_id: str, *, stdin: int | None,
                   stdout: int, stderr: int, terminal: bool,
                   on_first_output: Callable[[], None] | None = None) -> None:
    """Copy host ``stdin`` to the process and its output to host ``stdout``/``stderr``.

    ``stdin`` None closes the process's stdin at once.  Returns when the agent
    ends the output stream (both outputs reached EOF); host stdin may still be
    open then.  With ``terminal`` and a terminal on host stdin, that terminal is
    in raw mode for the duration (keystrokes such as ^C go to the process).
    ``on_first_output`` is called once, when the first output byte arrives.
    """
    raw_fd = stdin if terminal and stdin is not None and _isatty(stdin) else None
    saved = termios.tcgetattr(raw_fd) if raw_fd is not None else None
    try:
        if raw_fd is not None:
            # TCSANOW: keep what the user typed ahead.
            tty.setraw(raw_fd, termios.TCSANOW)
        if terminal:
            await _initial_resize(conn, container_id, exec_id, stdin, stdout)
        await _relay(conn, container_id, exec_id, stdin, (stdout, stderr), on_first_output)
    finally:
        if raw_fd is not None and saved is not None:
            termios.tcsetattr(raw_fd, termios.TCSADRAIN, saved)


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


async def _initial_resize(conn: AgentClient, container_id: str, exec_id: str,
                          stdin: int | None, stdout: int) -> None:
    size = host_terminal_size(stdin, stdout)
    if size is None:
        return
    try:
        await conn.resize(container_id, exec_id, size.lines, size.columns)
    except AgentError as exc:
        # A wrong window size is cosmetic; the relay matters more.
        logger.warning("cannot set the terminal size of %s/%s: %s", container_id, exec_id, exc)


async def _relay(conn: AgentClient, container_id: str, exec_id: str, stdin: int | None,
                 sinks: tuple[int, int], on_first_output: Callable[[], None] | None) -> None:
    reader = _StdinReader(stdin) if stdin is not None else None
    inputs = reader.inputs() if reader is not None else _closed_stdin()
    outputs = conn.io_stream(container_id, exec_id, inputs)
    writer = _OutputWriter(*sinks, on_first_output=on_first_output)
    try:
        async for output in outputs:
            writer.write(output)
    finally:
        if reader is not None:
            reader.stop()
        # Ends the call now, also when a host write failed mid-stream.
        aclose = getattr(outputs, "aclose", None)
        if aclose is not None:
            await aclose()


async def _closed_stdin() -> AsyncIterator[pb.IoInput]:
    yield pb.IoInput(close_stdin=True)


class _StdinReader:
    """Reads one host fd in a daemon thread; chunks reach the loop through a
    queue bounded by a semaphore that holds the thread back while it is full."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._loop = asyncio.get_running_loop()
        # Unbounded: the thread's items are bounded by the semaphore, and
        # stop() must always be able to add its marker (None).
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._slots = threading.Semaphore(STDIN_BACKLOG)
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    async def inputs(self) -> AsyncIterator[pb.IoInput]:
        """The process's stdin messages, ending with close_stdin at host EOF,
        or with nothing more once :meth:`stop` was called."""
        self._start()
        while True:
            chunk = await self._queue.get()
            if chunk is None:
                return
            if chunk == _EOF:
                yield pb.IoInput(close_stdin=True)
                return
            self._slots.release()
            yield pb.IoInput(stdin=chunk)

    def stop(self) -> None:
        """End :meth:`inputs` and stop handing chunks over.

        Ending the iterator matters: when the agent finishes the call first, the
        task consuming the iterator would otherwise linger until host stdin
        produced data.  A thread blocked in read() stays blocked until
        its fd has data or EOF; it is a daemon, so exit does not wait for it.
        """
        self._stopped.set()
        self._queue.put_nowait(None)

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"stdin-relay-{self._fd}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.is_set():
            chunk = self._read()
            if not self._acquire_slot():
                return
            if not self._hand_over(chunk) or chunk == _EOF:
                return

    def _read(self) -> bytes:
        while True:
            try:
                return os.read(self._fd, CHUNK_SIZE)
            except BlockingIOError:
                # Someone made the fd non-blocking; wait like a blocking read would.
                select.select([self._fd], [], [])
            except OSError as exc:
                # EIO on a hung-up terminal, EBADF on a closed fd: the input is over.
                logger.debug("reading stdin fd %d: %s; treating it as EOF", self._fd, exc)
                return _EOF

    def _acquire_slot(self) -> bool:
        while not self._stopped.is_set():
            if self._slots.acquire(timeout=_STOP_POLL_S):
                return True
        return False

    def _hand_over(self, chunk: bytes) -> bool:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, chunk)
        except RuntimeError:
            return False  # the loop is closed: nobody is listening any more
        return True


class _OutputWriter:
    """Writes output messages to host fds; a fd whose reader is gone (EPIPE) is
    skipped from then on so the stream is still drained to its end."""

    def __init__(self, stdout: int, stderr: int, *,
                 on_first_output: Callable[[], None] | None) -> None:
        self._fds = {"stdout": stdout, "stderr": stderr}
        self._broken: set[str] = set()
        self._on_first_output = on_first_output

    def write(self, output: pb.IoOutput) -> None:
        for name in ("stdout", "stderr"):
            data: bytes = getattr(output, name)
            if not data:
                continue
            if self._on_first_output is not None:
                callback, self._on_first_output = self._on_first_output, None
                callback()
            if name not in self._broken:
                self._write(name, data)

    def _write(self, name: str, data: bytes) -> None:
        fd = self._fds[name]
        try:
            _write_all(fd, data)
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.EBADF):
                raise
            logger.info("host %s (fd %d) is gone (%s); discarding further output",
                      name, fd, exc.strerror)
            self._broken.add(name)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            # A non-blocking fd (shared terminal): block here like a plain write.
            select.select([], [fd], [])
            continue
        view = view[written:]
