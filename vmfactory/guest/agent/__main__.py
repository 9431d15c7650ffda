"""Agent entry point: ``python -m vmfactory.guest.agent``.

Inside a VM (the default) it serves on a private unix socket, and a forked
bridge process relays the ``vmfactory.agent`` virtio-serial port to it: a
process, not a thread, so relaying never waits for the server's GIL.
``--listen unix:PATH --standin`` runs it as a host process instead (tests only).
"""

from __future__ import annotations

import signal

# Before anything can start a thread: SIGIO must stay blocked in every thread so
# that only the bridge's sigtimedwait() consumes it (its default action kills).
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGIO})

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from vmfactory.guest.agent import AGENT_PORT_NAME  # noqa: E402
from vmfactory.guest.agent.bridge import PortBridge, find_port  # noqa: E402
from vmfactory.guest.agent.ctlproto import CONTROL_PORT_NAME, READY_FILE  # noqa: E402
from vmfactory.guest.agent.platform import (  # noqa: E402
    GuestPlatform, HostStandInPlatform, Platform, read_uptime,
)

logger = logging.getLogger("vmfactory.guest.agent")

GUEST_LOCAL_SOCKET = "/run/vmfactory-agent.sock"
SOCKET_WAIT_S = 0.01


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


def _bridge_child(port: str) -> None:
    """The forked bridge: wait for the server's socket, then relay forever."""
    try:
        while not os.path.exists(GUEST_LOCAL_SOCKET):
            time.sleep(SOCKET_WAIT_S)  # only during agent start-up
        PortBridge(port, GUEST_LOCAL_SOCKET).run()
    except BaseException as exc:  # noqa: BLE001 - the process must not return
        logger.error("bridge failed: %r", exc)
    finally:
        os._exit(1)


def _start_reaper(critical: list[int]) -> None:
    """Reap every child on SIGCHLD: the agent is the guest's PID 1, so orphans and
    container monitors are its children.  A dead bridge or control loop makes the
    agent unreachable: exit then, so the failure is visible (the VM ends)."""
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
    """Tell the control loop that gRPC is up (it answers OP_STATUS from this)."""
    milestones = {k: getattr(boot, k) for k in ("init_start_s", "agent_start_s", "agent_ready_s")}
    tmp = READY_FILE + ".tmp"
    with open(tmp, "w") as f:
        json.dump(milestones, f)
    os.rename(tmp, READY_FILE)


async def serve(args: argparse.Namespace, agent_start: float, children: list[int],
                launcher_sock: socket.socket | None) -> None:
    import grpc

    from vmfactory.guest.agent.service import AgentService
    from vmfactory.proto import agent_pb2 as pb
    from vmfactory.proto import agent_pb2_grpc as pb_grpc

    platform: Platform = HostStandInPlatform() if args.standin else GuestPlatform()
    boot = pb.BootTimings(init_start_s=float(os.environ.get("VMF_INIT_UPTIME", "0")),
                          agent_start_s=agent_start)
    server = grpc.aio.server()
    pb_grpc.add_AgentServicer_to_server(AgentService(platform, boot), server)
    if launcher_sock is not None:  # containers need the guest: mounts, namespaces
        from vmfactory.guest.agent.container_service import ContainerService
        from vmfactory.guest.agent.containers import ContainerManager
        from vmfactory.guest.agent.launch import Launcher
        manager = ContainerManager(Launcher(launcher_sock))
        pb_grpc.add_ContainersServicer_to_server(ContainerService(manager), server)
    address = args.listen or f"unix:{GUEST_LOCAL_SOCKET}"
    if server.add_insecure_port(address) == 0:
        raise SystemExit(f"agent: cannot listen on {address}")
    await server.start()
    boot.agent_ready_s = read_uptime()
    if children:
        _write_ready(boot)
    logger.info("agent ready on %s (%s), uptime %.2fs", address, platform.name, boot.agent_ready_s)
    if children:
        _start_reaper(children)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    agent_start = read_uptime()
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="vmfactory-agent: %(message)s")
    children: list[int] = []
    launcher_sock = None
    if not args.listen:
        # Fork before grpc is imported: the children never touch grpc state, and
        # the launcher, which forks every container process, stays small.
        for port_name, child in ((args.port_name, _bridge_child),
                                 (CONTROL_PORT_NAME, _control_child)):
            port = find_port(port_name)
            pid = os.fork()
            if pid == 0:
                child(port)
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
