"""The standalone proxy process of ``kataProxy``: spawned in its own session (it
outlives the client that started it), stopped by pid, and its ``main``.

``python -m runtime_client.proxies --upstream unix:PATH --listen PATH [--ready-fd N]``
serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from runtime_client.errors import ProxyError
from runtime_client.helpers import (
    HelperArgumentParser, helper_process, report_ready, spawn_helper, stop_helper,
)
from runtime_client.proxies.forwarder import AgentProxy
from vmfactory.util.sockets import socket_accepts
from vmfactory.util.tasks import finish

logger = logging.getLogger(__name__)

PROG = "runtime_client.proxies"


async def spawn_proxy(upstream: str, listen: Path, *, timeout: float = 10.0,
                      log: Path | None = None) -> int:
    """Start the standalone proxy process in its own session (it must outlive the caller:
    another client process may use it later); wait for its ready line (bounded by
    timeout); return its pid. On failure/timeout kill it and raise ProxyError with the
    process's last stderr line.

    The process logs to ``log`` (appended) if given, else to an anonymous file.
    """
    pid = await spawn_helper(PROG, ["--upstream", upstream, "--listen", str(listen)],
                             log=log, timeout=timeout, error=ProxyError)
    logger.info("proxy process %d serving %s for %s", pid, listen, upstream)
    return pid


def stop_proxy(pid: int, listen: Path, timeout: float = 5.0) -> None:
    """SIGTERM, wait, SIGKILL if needed; only if the pid's cmdline contains
    'runtime_client.proxies' and the listen path (never kill a recycled pid); remove the
    socket file. Idempotent.

    A socket file still served by another process is left alone.
    """
    listen = Path(listen)
    if helper_process(pid, PROG, str(listen)) is not None:
        stop_helper(pid, PROG, str(listen), timeout)
        listen.unlink(missing_ok=True)
    if listen.is_socket() and not socket_accepts(listen):
        listen.unlink(missing_ok=True)


def _target(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("empty gRPC target")
    return value


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = HelperArgumentParser(prog=PROG, description="Forward gRPC calls to a VM's agent.")
    parser.add_argument("--upstream", required=True, type=_target,
                        help="the agent's gRPC target, e.g. unix:/run/vm/agent.sock")
    parser.add_argument("--listen", required=True, type=Path,
                        help="the unix socket path to serve")
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
        report_ready(ready_fd)  # the spawner may be gone; clients may still come
        await stop.wait()
        logger.info("signalled; stopping")
    finally:
        await finish(proxy.stop())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m runtime_client.proxies --upstream unix:PATH --listen PATH [--ready-fd N]``."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s proxy[%(process)d] %(levelname)s %(message)s")
    return asyncio.run(_serve(args.upstream, args.listen, args.ready_fd))


if __name__ == "__main__":
    sys.exit(main())
