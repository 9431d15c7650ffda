"""The standalone proxy process of ``kataProxy``: spawned in its own session (it
outlives the client that started it), stopped by pid, and its ``main``.

``python -m runtime_client.proxies --upstream unix:PATH --listen PATH [--ready-fd N]``
serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO, NoReturn

import psutil

from runtime_client.errors import ProxyError
from runtime_client.proxies.forwarder import AgentProxy
from vmfactory.util.sockets import socket_accepts
from vmfactory.util.tasks import finish

logger = logging.getLogger(__name__)

PROG = "runtime_client.proxies"
READY_LINE = b"ready\n"
_STOP_POLL_S = 0.05
_EXIT_WAIT_S = 1.0

# Popen objects of the proxies we spawned: keeps them from being garbage-collected
# while they run (a warning, and a zombie nobody reaps) until stop_proxy.
_SPAWNED: dict[int, subprocess.Popen[bytes]] = {}


async def spawn_proxy(upstream: str, listen: Path, *, timeout: float = 10.0,
                      log: Path | None = None) -> int:
    """Start the standalone proxy process in its own session (it must outlive the caller:
    another client process may use it later); wait for its ready line (bounded by
    timeout); return its pid. On failure/timeout kill it and raise ProxyError with the
    process's last stderr line.

    The process logs to ``log`` (appended) if given, else to an anonymous file.
    """
    stderr, offset = _open_stderr(log)
    read_fd, write_fd = os.pipe()
    try:
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", PROG, "--upstream", upstream,
                 "--listen", str(listen), "--ready-fd", str(write_fd)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                pass_fds=(write_fd,), start_new_session=True, env=_child_env())
        except OSError as exc:
            raise ProxyError(f"cannot start the proxy: {exc}") from exc
        finally:
            os.close(write_fd)  # else EOF never comes if the child dies
        await _await_ready(proc, read_fd, timeout, stderr, offset)
    finally:
        os.close(read_fd)
        stderr.close()
    _SPAWNED[proc.pid] = proc
    logger.info("proxy process %d serving %s for %s", proc.pid, listen, upstream)
    return proc.pid


def _child_env() -> dict[str, str]:
    """Our environment, with this package importable whatever the child's cwd."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _open_stderr(log: Path | None) -> tuple[IO[bytes], int]:
    """The child's stderr, and where this spawn's output starts in it."""
    if log is None:
        return tempfile.TemporaryFile(), 0
    try:
        stream = open(log, "a+b")  # closed by spawn_proxy once the child holds it
    except OSError as exc:
        raise ProxyError(f"cannot open the proxy log {log}: {exc}") from exc
    return stream, stream.seek(0, os.SEEK_END)


async def _await_ready(proc: subprocess.Popen[bytes], read_fd: int, timeout: float,
                       stderr: IO[bytes], offset: int) -> None:
    """Return once ``proc`` reports ready; else kill it and raise ProxyError."""
    try:
        ready = await asyncio.wait_for(_read_ready_line(read_fd), timeout)
    except TimeoutError:
        _kill(proc)
        raise ProxyError(f"proxy not ready within {timeout:g} s: "
                         f"{_last_line(stderr, offset)}") from None
    except BaseException:
        _kill(proc)  # also when our caller gives up (CancelledError): no orphan proxy
        raise
    if ready:
        return
    # The pipe closed without a ready line: the process is exiting.
    for _ in range(int(_EXIT_WAIT_S / _STOP_POLL_S)):
        if proc.poll() is not None:
            break
        await asyncio.sleep(_STOP_POLL_S)
    _kill(proc)
    raise ProxyError(f"proxy exited with status {proc.returncode}: "
                     f"{_last_line(stderr, offset)}")


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


def stop_proxy(pid: int, listen: Path, timeout: float = 5.0) -> None:
    """SIGTERM, wait (psutil), SIGKILL if needed; only if the pid's cmdline contains
    'runtime_client.proxies' and the listen path (never kill a recycled pid); remove the
    socket file. Idempotent.

    A socket file still served by another process is left alone.
    """
    listen = Path(listen)
    popen = _SPAWNED.pop(pid, None)
    proc = _proxy_process(pid, listen, popen)
    if proc is not None:
        _terminate(proc, timeout)
        listen.unlink(missing_ok=True)
    if popen is not None:
        popen.poll()  # settle its returncode: psutil has reaped it
    if listen.is_socket() and not socket_accepts(listen):
        listen.unlink(missing_ok=True)


def _proxy_process(pid: int, listen: Path,
                   popen: subprocess.Popen[bytes] | None) -> psutil.Process | None:
    """The live proxy process ``pid`` serving ``listen``, or None."""
    if popen is not None and popen.poll() is not None:
        return None  # it exited and is reaped now: the pid is no longer ours
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        cmdline = proc.cmdline()
    except psutil.Error:
        return None
    if PROG in cmdline and str(listen) in cmdline:
        return proc
    logger.warning("pid %d is not the proxy for %s; not signalling it", pid, listen)
    return None


def _terminate(proc: psutil.Process, timeout: float) -> None:
    """SIGTERM ``proc``, SIGKILL it if it has not exited within ``timeout``."""
    try:
        proc.terminate()
        try:
            proc.wait(timeout)
        except psutil.TimeoutExpired:
            logger.warning("proxy %d ignored SIGTERM for %g s; killing it", proc.pid, timeout)
            proc.kill()
            proc.wait(timeout)
    except psutil.NoSuchProcess:
        pass


class _ArgumentParser(argparse.ArgumentParser):
    """Reports bad arguments on one line (the spawner shows only the last one)."""

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


def _target(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("empty gRPC target")
    return value


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _ArgumentParser(prog=PROG, description="Forward gRPC calls to a VM's agent.")
    parser.add_argument("--upstream", required=True, type=_target,
                        help="the agent's gRPC target, e.g. unix:/run/vm/agent.sock")
    parser.add_argument("--listen", required=True, type=Path,
                        help="the unix socket path to serve")
    parser.add_argument("--ready-fd", type=_ready_fd,
                        help="write 'ready' to this descriptor once serving, then close it")
    return parser.parse_args(argv)


async def _serve(upstream: str, listen: Path, ready_fd: int | None) -> int:
    """Run a proxy until SIGTERM/SIGINT; the process's exit code."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Before start(): a SIGTERM during startup still goes through stop().
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    proxy = AgentProxy(upstream, listen)
    try:
        await proxy.start()
    except ProxyError as exc:
        print(f"{PROG}: cannot start: {exc}", file=sys.stderr, flush=True)
        return 1
    try:
        if ready_fd is not None:
            _report_ready(ready_fd)
        await stop.wait()
        logger.info("signalled; stopping")
    finally:
        await finish(proxy.stop())
    return 0


def _report_ready(fd: int) -> None:
    try:
        os.write(fd, READY_LINE)
    except OSError as exc:
        # The spawner is gone; clients may still come, so keep serving.
        logger.warning("cannot report ready: %s", exc)
    finally:
        os.close(fd)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m runtime_client.proxies --upstream unix:PATH --listen PATH [--ready-fd N]``."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s proxy[%(process)d] %(levelname)s %(message)s")
    return asyncio.run(_serve(args.upstream, args.listen, args.ready_fd))


if __name__ == "__main__":
    sys.exit(main())
