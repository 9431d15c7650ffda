"""Agent entry point: ``python -m vmfactory.guest.agent``.

Inside a VM (the default) it serves ttrpc on the ``vmfactory.agent``
virtio-serial port itself (see ``port``); forked children run the control
channel and the launcher of container processes.  ``--listen unix:PATH
--standin`` serves a unix socket as a host process instead (tests only).
"""

from __future__ import annotations

import signal

# Before anything can start a thread or fork: SIGIO (whose default action kills)
# stays blocked in the control child, which consumes it with sigtimedwait(); the
# port server unblocks it once its handler is in place.
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGIO})

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

from vmfactory.guest.agent import AGENT_PORT_NAME  # noqa: E402
from vmfactory.guest.agent.port import find_port  # noqa: E402
from vmfactory.guest.agent.ctlproto import CONTROL_PORT_NAME, READY_FILE  # noqa: E402
from vmfactory.guest.agent.platform import (  # noqa: E402
    GuestPlatform, HostStandInPlatform, Platform, read_uptime,
)

if TYPE_CHECKING:
    from vmfactory.proto import agent_pb2 as pb
    from vmfactory.ttrpc import aio

logger = logging.getLogger("vmfactory.guest.agent")


def _parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vmfactory-agent")
    p.add_argument("--listen", help="serve on this address instead of the virtio port")
    p.add_argument("--standin", action="store_true",
                   help="host-process stand-in: simulate clock/RNG changes (tests only)")
    p.add_argument("--port-name", default=AGENT_PORT_NAME)
    return p.parse_args(argv)


def _control_child(port: str) -> None:
    """The forked control-channel server (see ctlproto)."""
    from vmfactory.guest.agent.control import ControlServer

    try:
        ControlServer(port).run()
    except BaseException as exc:  # noqa: BLE001 - the process must not return
        logger.error("control channel failed: %r", exc)
    finally:
        os._exit(1)


def _launcher_child(sock: socket.socket) -> None:
    """The forked launcher of container processes (see launch)."""
    from vmfactory.guest.agent.launch import serve_launcher

    try:
        serve_launcher(sock)
    except BaseException as exc:  # noqa: BLE001 - the process must not return
        logger.error("launcher failed: %r", exc)
    finally:
        os._exit(1)


def _start_reaper(critical: list[int]) -> None:
    """Reap every child on SIGCHLD: the agent is the guest's PID 1, so orphans and
    container monitors are its children.  A dead control loop or launcher cripples
    the agent: exit then, so the failure is visible (the VM ends)."""
    def reap() -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in critical:
                logger.error("agent child %d exited (status %d): agent exiting", pid, status)
                os._exit(1)

    asyncio.get_running_loop().add_signal_handler(signal.SIGCHLD, reap)
    reap()


def _write_ready(boot: object) -> None:
    """Tell the control loop that the agent serves (it answers OP_STATUS from this)."""
    milestones = {k: getattr(boot, k) for k in ("init_start_s", "agent_start_s", "agent_ready_s")}
    tmp = READY_FILE + ".tmp"
    with open(tmp, "w") as f:
        json.dump(milestones, f)
    os.rename(tmp, READY_FILE)


async def serve(args: argparse.Namespace, agent_start: float, children: list[int],
                launcher_sock: socket.socket | None) -> None:
    from vmfactory.guest.agent.clock import ClockFollower
    from vmfactory.guest.agent.rpc import build_server
    from vmfactory.guest.agent.service import AgentService
    from vmfactory.proto import agent_pb2 as pb

    platform: Platform = HostStandInPlatform() if args.standin else GuestPlatform()
    boot = pb.BootTimings(init_start_s=float(os.environ.get("VMF_INIT_UPTIME", "0")),
                          agent_start_s=agent_start)
    containers = None
    if launcher_sock is not None:  # containers need the guest: mounts, namespaces
        from vmfactory.guest.agent.container_service import ContainerService
        from vmfactory.guest.agent.containers import ContainerManager
        from vmfactory.guest.agent.launch import Launcher
        containers = ContainerService(ContainerManager(Launcher(launcher_sock)))
    server = build_server(AgentService(platform, boot), containers, ClockFollower(platform))
    if args.listen:
        await _serve_unix(server, args.listen, boot, platform)
        return
    from vmfactory.guest.agent.port import PortServer
    port = PortServer(find_port(args.port_name), server)
    boot.agent_ready_s = read_uptime()
    _write_ready(boot)
    logger.info("agent ready on port %s (%s), uptime %.2fs", args.port_name, platform.name,
                boot.agent_ready_s)
    _start_reaper(children)
    await port.run()


async def _serve_unix(server: aio.Server, listen: str, boot: pb.BootTimings,
                      platform: Platform) -> None:
    if not listen.startswith("unix:"):
        raise SystemExit(f"agent: --listen takes unix:PATH, not {listen!r}")
    listener = await server.start_unix_server(listen.removeprefix("unix:"))
    boot.agent_ready_s = read_uptime()
    logger.info("agent ready on %s (%s)", listen, platform.name)
    async with listener:
        await listener.serve_forever()


def main(argv: list[str] | None = None) -> int:
    agent_start = read_uptime()
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="vmfactory-agent: %(message)s")
    children: list[int] = []
    launcher_sock = None
    if not args.listen:
        # Fork before the services are imported: the launcher, which forks every
        # container process, stays small.
        port = find_port(CONTROL_PORT_NAME)
        pid = os.fork()
        if pid == 0:
            _control_child(port)
        children.append(pid)
        launcher_sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            launcher_sock.close()
            _launcher_child(theirs)
        theirs.close()
        children.append(pid)
    asyncio.run(serve(args, agent_start, children, launcher_sock))
    return 0


if __name__ == "__main__":
    sys.exit(main())
