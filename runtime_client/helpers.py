"""Helper processes the runtime client leaves running: the ``kataProxy`` proxy
and the lease keeper.

Each runs in its own session (it outlives the client that started it), writes
``ready`` on a pipe once it works (:func:`report_ready`), and is stopped by pid,
only while that pid still runs it: its command line must name its module and
its key argument, so a recycled pid is never signalled.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO, NoReturn

import psutil

from runtime_client.errors import ClientError

logger = logging.getLogger(__name__)

READY_LINE = b"ready\n"
STOP_POLL_S = 0.05
EXIT_WAIT_S = 1.0

# Popen objects of the helpers we spawned: keeps them from being garbage-collected
# while they run (a warning, and a zombie nobody reaps) until stop_helper.
_SPAWNED: dict[int, subprocess.Popen[bytes]] = {}


async def spawn_helper(module: str, args: Sequence[str], *, log: Path | None = None,
                       timeout: float = 10.0,
                       error: type[ClientError] = ClientError) -> int:
    """``python -m module ARGS --ready-fd N`` in its own session; its pid once it
    reported ready within ``timeout``.  Otherwise it is killed and ``error`` says
    why, with the last line it wrote.  Its output goes to ``log`` (appended)."""
    stderr, offset = _open_stderr(log, error)
    read_fd, write_fd = os.pipe()
    try:
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", module, *args, "--ready-fd", str(write_fd)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                pass_fds=(write_fd,), start_new_session=True, env=_child_env())
        except OSError as exc:
            raise error(f"cannot start {module}: {exc}") from exc
        finally:
            os.close(write_fd)  # else EOF never comes if the child dies
        await _await_ready(proc, read_fd, timeout, stderr, offset, error)
    finally:
        os.close(read_fd)
        stderr.close()
    _SPAWNED[proc.pid] = proc
    return proc.pid


def _child_env() -> dict[str, str]:
    """Our environment, with this package importable whatever the child's cwd."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _open_stderr(log: Path | None, error: type[ClientError]) -> tuple[IO[bytes], int]:
    """The child's stderr, and where this spawn's output starts in it."""
    if log is None:
        return tempfile.TemporaryFile(), 0
    try:
        stream = open(log, "a+b")  # closed by spawn_helper once the child holds it
    except OSError as exc:
        raise error(f"cannot open the log {log}: {exc}") from exc
    return stream, stream.seek(0, os.SEEK_END)


async def _await_ready(proc: subprocess.Popen[bytes], read_fd: int, timeout: float,
                       stderr: IO[bytes], offset: int, error: type[ClientError]) -> None:
    """Return once ``proc`` reports ready; else kill it and raise ``error``."""
    try:
        ready = await asyncio.wait_for(_read_ready_line(read_fd), timeout)
    except TimeoutError:
        _kill(proc)
        raise error(f"not ready within {timeout:g} s: {_last_line(stderr, offset)}") from None
    except BaseException:
        _kill(proc)  # also when our caller gives up (CancelledError): no orphan
        raise
    if ready:
        return
    # The pipe closed without a ready line: the process is exiting.
    for _ in range(int(EXIT_WAIT_S / STOP_POLL_S)):
        if proc.poll() is not None:
            break
        await asyncio.sleep(STOP_POLL_S)
    _kill(proc)
    raise error(f"exited with status {proc.returncode}: {_last_line(stderr, offset)}")


async def _read_ready_line(fd: int) -> bool:
    """Read ``fd`` up to a newline or EOF; whether it said ready."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    done: asyncio.Future[bool] = loop.create_future()
    received = bytearray()

    def on_readable() -> None:
        try:
            chunk = os.read(fd, 64)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        received.extend(chunk)
        if (not chunk or b"\n" in received) and not done.done():
            done.set_result(received.startswith(READY_LINE))

    loop.add_reader(fd, on_readable)
    try:
        return await done
    finally:
        loop.remove_reader(fd)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL and reap ``proc`` (blocking, but SIGKILL takes effect at once)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=5)


def _last_line(stream: IO[bytes], offset: int) -> str:
    """The last non-blank line ``stream`` received since ``offset``."""
    try:
        stream.seek(offset)
        tail = stream.read()[-4096:].decode(errors="replace")
    except OSError as exc:
        return f"(cannot read its stderr: {exc})"
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def helper_process(pid: int, module: str, key: str) -> psutil.Process | None:
    """The live process ``pid`` if it runs ``module`` for ``key``, else None."""
    popen = _SPAWNED.get(pid)
    if not pid or (popen is not None and popen.poll() is not None):
        return None  # it exited and is reaped now: the pid is no longer ours
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        cmdline = proc.cmdline()
    except psutil.Error:
        return None
    if module in cmdline and key in cmdline:
        return proc
    logger.warning("pid %d is not the %s for %s; not signalling it", pid, module, key)
    return None


def stop_helper(pid: int, module: str, key: str, timeout: float = 5.0) -> None:
    """SIGTERM the helper ``pid`` (SIGKILL after ``timeout``), if it still is the
    ``module`` helper for ``key``; idempotent."""
    proc = helper_process(pid, module, key)
    popen = _SPAWNED.pop(pid, None)
    if proc is not None:
        try:
            proc.terminate()
            try:
                proc.wait(timeout)
            except psutil.TimeoutExpired:
                logger.warning("%s %d ignored SIGTERM for %g s; killing it", module, pid, timeout)
                proc.kill()
                proc.wait(timeout)
        except psutil.NoSuchProcess:
            pass
    if popen is not None:
        popen.poll()  # settle its returncode: psutil has reaped it


def report_ready(fd: int | None) -> None:
    """The helper's side: say ready on ``fd`` and close it (the spawner may be gone)."""
    if fd is None:
        return
    try:
        os.write(fd, READY_LINE)
    except OSError as exc:
        logger.warning("cannot report ready: %s", exc)
    finally:
        os.close(fd)


class HelperArgumentParser(argparse.ArgumentParser):
    """Reports bad arguments on one line (the spawner shows only the last one), and
    takes the ``--ready-fd`` every helper gets."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.add_argument("--ready-fd", type=_ready_fd,
                          help="write 'ready' to this descriptor once working, then close it")

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def _ready_fd(value: str) -> int:
    try:
        fd = int(value)
        os.fstat(fd)
    except (ValueError, OSError) as exc:
        raise argparse.ArgumentTypeError(f"not an open file descriptor: {value!r}") from exc
    return fd
