"""The standalone shim process of Kata's ``katashim`` mode.

``python -m runtime_client.shims --address ADDR --container CID [--exec EID]
[--terminal] [--timeout S]`` relays stdio between its own fds 0/1/2 and one
container process, forwards every signal it receives to that process, and exits
with the process's exit code (128+N if signal N killed it).  Exit 125: the agent
is unreachable or refused a call; exit 2: bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from runtime_client.shims.builtin import BuiltinShim
from vmfactory.agent.client import AgentClient
from vmfactory.errors import AgentError, VmFactoryError

logger = logging.getLogger(__name__)

PROG = "katashim"
# The shim's own failures, as opposed to the container process's exit codes
# (the convention of docker/podman run).
EXIT_SHIM_FAILED = 125
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DEFAULT_TIMEOUT_S = 10.0


class _ArgumentParser(argparse.ArgumentParser):
    """Reports bad arguments on one line: the container's stderr is ours too."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(EXIT_USAGE)


def _nonempty(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def _positive(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {value!r}")
    return seconds


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _ArgumentParser(prog=PROG, description="Relay one container process's stdio "
                                                    "and signals (Kata's katashim).")
    parser.add_argument("--address", required=True, type=_nonempty,
                        help="gRPC target of the agent or a proxy, e.g. unix:/run/vm/proxy.sock")
    parser.add_argument("--container", required=True, type=_nonempty, help="container id")
    parser.add_argument("--exec", default="", dest="exec_id",
                        help="exec id; empty (default) is the container's first process")
    parser.add_argument("--terminal", action="store_true",
                        help="the process has a terminal: raw host tty, resize on SIGWINCH")
    parser.add_argument("--timeout", type=_positive, default=DEFAULT_TIMEOUT_S,
                        help=f"deadline of each agent call, seconds (default {DEFAULT_TIMEOUT_S:g})")
    return parser.parse_args(argv)


async def _run(args: argparse.Namespace) -> int:
    conn = AgentClient(args.address, call_timeout=args.timeout, wait_for_ready=True)
    try:
        await _check_reachable(conn)
        return await BuiltinShim().run(conn, args.container, args.exec_id,
                                       terminal=args.terminal, stdin=0, stdout=1, stderr=2)
    finally:
        await conn.close()


async def _check_reachable(conn: AgentClient) -> None:
    """Fail within the call timeout: the wait and the I/O stream would wait for
    an unreachable agent forever."""
    try:
        await conn.ping()
    except AgentError as exc:
        raise AgentError("ping", f"{conn.address} is unreachable ({exc.code or exc})") from exc


def main(argv: Sequence[str] | None = None) -> int:
    """Run the shim; the container process's exit code, or 125/2 on our failures."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"{PROG}[%(process)d] %(levelname)s %(message)s")
    try:
        return asyncio.run(_run(args))
    except VmFactoryError as exc:
        sys.stderr.write(f"{PROG}: {exc}\n")
        return EXIT_SHIM_FAILED
    except KeyboardInterrupt:
        # SIGINT before the forwarding handlers were installed.
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
