"""Agent entry point: ``python -m vmfactory.guest.agent``.

Inside a VM (the default) it serves on a private unix socket and bridges the
``vmfactory.agent`` virtio-serial port to it.  ``--listen unix:PATH
--standin`` runs it as a host process instead (tests only).
"""

from __future__ import annotations

import signal

# Before anything can start a thread: SIGIO must stay blocked in every thread so
# that only the bridge's sigtimedwait() consumes it (its default action kills).
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGIO})

import argparse  # noqa: E402
import asyncio  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import grpc  # noqa: E402

from vmfactory.guest.agent import AGENT_PORT_NAME  # noqa: E402
from vmfactory.guest.agent.bridge import PortBridge, find_port  # noqa: E402
from vmfactory.guest.agent.platform import (  # noqa: E402
    GuestPlatform, HostStandInPlatform, Platform, read_uptime,
)
from vmfactory.guest.agent.service import AgentService  # noqa: E402
from vmfactory.proto import agent_pb2 as pb  # noqa: E402
from vmfactory.proto import agent_pb2_grpc as pb_grpc  # noqa: E402

logger = logging.getLogger("vmfactory.guest.agent")

GUEST_LOCAL_SOCKET = "/run/vmfactory-agent.sock"


def _parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vmfactory-agent")
    p.add_argument("--listen", help="serve on this address instead of the virtio port")
    p.add_argument("--standin", action="store_true",
                   help="host-process stand-in: simulate clock/RNG changes (tests only)")
    p.add_argument("--port-name", default=AGENT_PORT_NAME)
    return p.parse_args(argv)


async def serve(args: argparse.Namespace, agent_start: float) -> None:
    platform: Platform = HostStandInPlatform() if args.standin else GuestPlatform()
    boot = pb.BootTimings(init_start_s=float(os.environ.get("VMF_INIT_UPTIME", "0")),
                          agent_start_s=agent_start)
    server = grpc.aio.server()
    pb_grpc.add_AgentServicer_to_server(AgentService(platform, boot), server)
    address = args.listen or f"unix:{GUEST_LOCAL_SOCKET}"
    if server.add_insecure_port(address) == 0:
        raise SystemExit(f"agent: cannot listen on {address}")
    await server.start()
    if not args.listen:
        PortBridge(find_port(args.port_name), GUEST_LOCAL_SOCKET).start()
    boot.agent_ready_s = read_uptime()
    logger.info("agent ready on %s (%s), uptime %.2fs", address, platform.name, boot.agent_ready_s)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    agent_start = read_uptime()
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="vmfactory-agent: %(message)s")
    asyncio.run(serve(args, agent_start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
