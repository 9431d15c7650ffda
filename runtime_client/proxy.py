"""A gRPC forwarder to a VM's guest agent: Kata's ``kataProxy`` / ``kataProxyBuiltin``.

A VM's agent is reachable from the host through one unix socket (a QEMU
virtio-serial chardev) that accepts ONE connection at a time.  :class:`AgentProxy`
owns that connection and serves any number of host clients on its own socket,
forwarding every call, whatever its service and method, as raw bytes.  Embedded in
a client process it is the builtin proxy; ``python -m runtime_client.proxy`` runs it
as a standalone process that outlives the process that started it
(:func:`spawn_proxy`, :func:`stop_proxy`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import IO, NoReturn

import grpc
import psutil

from runtime_client.errors import ClientError, ended_during_write
from vmfactory.agent.client import CHANNEL_OPTIONS  # the agent channel's reconnect policy

_LOG = logging.getLogger(__name__)

PROG = "runtime_client.proxy"
READY_LINE = b"ready\n"
# sun_path is 108 bytes, NUL included.
MAX_SOCKET_PATH = 107

# Transport-level headers the gRPC stack sets itself; passing them on as call
# metadata is rejected or would lie about the proxy's own connection.
_RESERVED_METADATA = frozenset({"user-agent", "content-type", "te", "host", "authority"})

_STOP_POLL_S = 0.05
_EXIT_WAIT_S = 1.0

Metadata = tuple[tuple[str, str | bytes], ...]


class ProxyError(ClientError):
    """The proxy cannot bind, start, or be spawned."""


def _forwardable(metadata: Sequence[tuple[str, str | bytes]] | None) -> Metadata:
    """``metadata`` minus pseudo-headers and keys reserved to the gRPC transport."""
    return tuple((key, value) for key, value in (metadata or ())
                 if not key.startswith((":", "grpc-")) and key not in _RESERVED_METADATA)


class _ForwardEverything(grpc.GenericRpcHandler):
    """Answers every method with one bidi handler working on raw bytes: on the wire a
    unary call is a stream of one message, so it serves all four call kinds."""

    def __init__(self, forward: Callable[[str, AsyncIterator[bytes],
                                          grpc.aio.ServicerContext], Awaitable[None]]) -> None:
        self._forward = forward

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = handler_call_details.method

        async def behavior(requests: AsyncIterator[bytes],
                           context: grpc.aio.ServicerContext) -> None:
            await self._forward(method, requests, context)

        return grpc.stream_stream_rpc_method_handler(behavior)


class AgentProxy:
    """Serves ``listen`` (a unix socket path) and forwards every gRPC call, whatever its
    service and method, over ONE channel to ``upstream`` (e.g. "unix:/run/.../agent.sock").

    A call waits for the upstream connection for at most its own deadline, or
    ``connect_timeout`` seconds if it has none (then it fails with UNAVAILABLE).
    """

    def __init__(self, upstream: str, listen: Path, *, connect_timeout: float = 10.0) -> None:
        self.upstream = upstream
        self.listen = Path(listen)
        self.connect_timeout = connect_timeout
        self._server: grpc.aio.Server | None = None
        self._channel: grpc.aio.Channel | None = None
        self._started = False
        self._stopped = False
        self._calls = 0

    @property
    def address(self) -> str:
        """The gRPC target clients use to reach the proxy: ``unix:<listen>``."""
        return f"unix:{self.listen}"

    @property
    def calls(self) -> int:
        """Calls forwarded so far (counted when they arrive, whatever their outcome)."""
        return self._calls

    async def start(self) -> None:
        """Bind ``listen`` (mode 0600; a stale socket file is removed first) and serve.

        Raises :class:`ProxyError` if the socket cannot be bound, or if another
        process serves it already.
        """
        if self._started:
            raise ProxyError(f"proxy on {self.listen} was already started")
        self._started = True
        _prepare_socket_path(self.listen)
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((_ForwardEverything(self._forward),))
        try:
            if server.add_insecure_port(self.address) == 0:
                raise RuntimeError(f"failed to bind to {self.address}")
            # grpc binds in add_insecure_port; restrict the socket before serving.
            os.chmod(self.listen, 0o600)
            await server.start()
        except (RuntimeError, OSError) as exc:
            await server.stop(None)
            self.listen.unlink(missing_ok=True)
            raise ProxyError(f"cannot serve {self.listen}: {exc}") from exc
        self._server = server
        self._channel = grpc.aio.insecure_channel(self.upstream, options=CHANNEL_OPTIONS)
        # Start the handshake now so the first call does not pay for it.
        self._channel.get_state(try_to_connect=True)
        _LOG.info("proxy serving %s for %s", self.listen, self.upstream)

    async def stop(self, grace: float = 1.0) -> None:
        """Stop serving (calls in flight get ``grace`` seconds), close the upstream
        channel and remove the socket file.  Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        server, self._server = self._server, None
        channel, self._channel = self._channel, None
        try:
            if server is not None:
                await server.stop(grace)
        finally:
            if channel is not None:
                await channel.close()
            if server is not None:
                self.listen.unlink(missing_ok=True)
                _LOG.info("proxy on %s stopped after %d calls", self.listen, self._calls)

    async def _forward(self, method: str, requests: AsyncIterator[bytes],
                       context: grpc.aio.ServicerContext) -> None:
        """Relay one call of any kind to the upstream and its outcome back."""
        self._calls += 1
        channel = self._channel
        if channel is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "proxy is stopping")
            return
        await self._await_upstream(channel, context, context.time_remaining())
        call = channel.stream_stream(method)(
            timeout=context.time_remaining(), metadata=_forwardable(context.invocation_metadata()),
            wait_for_ready=True)
        # Requests and responses flow at the same time: stdin/stdout relays need both.
        pump = asyncio.create_task(_pump_requests(method, requests, call))
        try:
            await _relay_responses(call, context)
        except grpc.aio.AioRpcError as exc:
            if ended_during_write(exc):
                # Every response was relayed and the upstream ended OK; grpc only
                # misreported it because our request write raced with that end.
                _LOG.debug("%s: upstream ended as a request was written", method)
                return
            _LOG.debug("%s: upstream ended with %s", method, exc.code().name)
            await context.abort(exc.code(), exc.details() or "",
                                _forwardable(exc.trailing_metadata()))
        finally:
            # A no-op when the call is done; otherwise the caller went away.
            call.cancel()
            pump.cancel()
            await asyncio.wait([pump])

    async def _await_upstream(self, channel: grpc.aio.Channel,
                              context: grpc.aio.ServicerContext, timeout: float | None) -> None:
        """Wait until the upstream connection is up, within the call's time."""
        if channel.get_state(try_to_connect=True) is grpc.ChannelConnectivity.READY:
            return
        limit = self.connect_timeout if timeout is None else min(timeout, self.connect_timeout)
        try:
            await asyncio.wait_for(channel.channel_ready(), limit)
        except TimeoutError:
            code = grpc.StatusCode.UNAVAILABLE
            if timeout is not None and timeout <= self.connect_timeout:
                code = grpc.StatusCode.DEADLINE_EXCEEDED
            _LOG.warning("upstream %s not reachable within %.3g s", self.upstream, limit)
            await context.abort(code, f"upstream {self.upstream} not reachable "
                                      f"within {limit:.3g} s")


async def _pump_requests(method: str, requests: AsyncIterator[bytes],
                         call: grpc.aio.StreamStreamCall) -> None:
    """Copy the caller's request stream to the upstream call, then half-close it."""
    try:
        async for message in requests:
            await call.write(message)
        await call.done_writing()
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
        # The upstream call ended first; its status reaches the caller on the
        # response side.
        _LOG.debug("%s: upstream finished before the caller's requests", method)
    except Exception:
        _LOG.warning("%s: relaying requests failed", method, exc_info=True)
        call.cancel()


async def _relay_responses(call: grpc.aio.StreamStreamCall,
                           context: grpc.aio.ServicerContext) -> None:
    """Copy the upstream's metadata and responses to the caller; raises the
    upstream's error status as AioRpcError."""
    initial = _forwardable(await call.initial_metadata())
    if initial:
        await context.send_initial_metadata(initial)
    async for message in call:
        await context.write(message)
    trailing = _forwardable(await call.trailing_metadata())
    if trailing:
        context.set_trailing_metadata(trailing)


# --- the socket file -------------------------------------------------------------------

def _socket_is_live(path: Path) -> bool:
    """Whether some process accepts connections on the unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:
            return True  # a full backlog or someone else's socket: not ours to remove
        return True


def _prepare_socket_path(path: Path) -> None:
    """Check ``path`` can hold our socket; remove a stale socket file left there."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ProxyError(f"socket path is longer than {MAX_SOCKET_PATH} bytes: {path}")
    # Checked here too so the common mistakes get a plain message, not grpc's log lines.
    if not path.parent.is_dir():
        raise ProxyError(f"cannot serve {path}: no directory {path.parent}")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ProxyError(f"cannot serve {path}: {path.parent} is not writable")
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ProxyError(f"cannot use {path}: {exc}") from exc
    if not stat.S_ISSOCK(mode):
        raise ProxyError(f"{path} exists and is not a socket")
    if _socket_is_live(path):
        raise ProxyError(f"{path} is already served by another process")
    _LOG.info("removing stale socket %s", path)
    path.unlink(missing_ok=True)


# --- the standalone process -------------------------------------------------------------

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
    _LOG.info("proxy process %d serving %s for %s", proc.pid, listen, upstream)
    return proc.pid


def _child_env() -> dict[str, str]:
    """Our environment, with this package importable whatever the child's cwd."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
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
    'runtime_client.proxy' and the listen path (never kill a recycled pid); remove the
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
    if listen.is_socket() and not _socket_is_live(listen):
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
    _LOG.warning("pid %d is not the proxy for %s; not signalling it", pid, listen)
    return None


def _terminate(proc: psutil.Process, timeout: float) -> None:
    """SIGTERM ``proc``, SIGKILL it if it has not exited within ``timeout``."""
    try:
        proc.terminate()
        try:
            proc.wait(timeout)
        except psutil.TimeoutExpired:
            _LOG.warning("proxy %d ignored SIGTERM for %g s; killing it", proc.pid, timeout)
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
        _LOG.info("signalled; stopping")
    finally:
        await proxy.stop()
    return 0


def _report_ready(fd: int) -> None:
    try:
        os.write(fd, READY_LINE)
    except OSError as exc:
        # The spawner is gone; clients may still come, so keep serving.
        _LOG.warning("cannot report ready: %s", exc)
    finally:
        os.close(fd)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m runtime_client.proxy --upstream unix:PATH --listen PATH [--ready-fd N]``."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s proxy[%(process)d] %(levelname)s %(message)s")
    return asyncio.run(_serve(args.upstream, args.listen, args.ready_fd))


if __name__ == "__main__":
    sys.exit(main())
