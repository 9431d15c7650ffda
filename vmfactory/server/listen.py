"""Where the daemon listens: its unix socket (through the peer gate), and a
loopback TCP port only with a token.

:class:`Listener` serves the Factory API (+ gRPC health and reflection) and
stops in reverse: no new calls, in-flight ones get the grace, then the gate
closes its connections and removes its sockets.
"""

from __future__ import annotations

import grp
import logging
import os
import stat
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from vmfactory.daemon.core import Daemon
from vmfactory.errors import DaemonError, quote
from vmfactory.proto import factory_pb2_grpc as pb_grpc
from vmfactory.server.errors import ErrorInterceptor
from vmfactory.server.grpc_service import SERVICE_NAME, Callers, FactoryService
from vmfactory.server.peers import PeerGate
from vmfactory.util.sockets import socket_accepts

logger = logging.getLogger(__name__)

MIN_TOKEN = 32
MAX_MESSAGE = 1 << 20


def claim_socket(path: Path) -> None:
    """Refuse a socket another daemon answers on; remove a stale one (a killed
    daemon's)."""
    if not path.exists() and not path.is_symlink():
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        return
    if socket_accepts(path):
        raise DaemonError(f"another daemon is serving on {path}")
    logger.info("removing stale socket %s", path)
    path.unlink()


def secure_socket(path: Path, mode: str, group: str) -> None:
    os.chmod(path, int(mode, 8))
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise DaemonError(f"daemon.socket_group: no group {quote(group)}") from None
        os.chown(path, -1, gid)


def read_token(path: str) -> str:
    """The TCP listener's token: a regular file of root's, mode 0600 or stricter,
    holding at least 32 characters."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise DaemonError(f"daemon.tcp_token_file {path}: {exc.strerror}") from exc
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077:
            raise DaemonError(f"daemon.tcp_token_file {path} must be a regular file of "
                              "root's with mode 0600")
        token = f.read(4096).strip()
    if len(token) < MIN_TOKEN or not token.isprintable():
        raise DaemonError(f"daemon.tcp_token_file {path} must hold a token of at least "
                          f"{MIN_TOKEN} printable characters")
    return token


class Listener:
    """The daemon's endpoints; :meth:`start` once, :meth:`stop` is idempotent."""

    def __init__(self, daemon: Daemon, config_toml: str) -> None:
        cfg = daemon.config.daemon
        self.daemon = daemon
        self.config_toml = config_toml
        self.gate = PeerGate(cfg.socket, daemon.config.paths.run_dir / ".gate",
                             cfg.max_connections)
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        cfg = self.daemon.config.daemon
        claim_socket(cfg.socket)
        token = read_token(cfg.tcp_token_file) if cfg.tcp else ""
        self.gate.prepare()
        server = grpc.aio.server(interceptors=[ErrorInterceptor()], options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE)])
        self._server = server
        pb_grpc.add_FactoryServicer_to_server(
            FactoryService(self.daemon, Callers(self.gate, token), self.config_toml), server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME], server)
        server.add_insecure_port(self.gate.address)
        if cfg.tcp and server.add_insecure_port(cfg.tcp) == 0:
            raise DaemonError(f"daemon.tcp: cannot listen on {cfg.tcp}")
        await server.start()
        await self.gate.start()
        secure_socket(cfg.socket, cfg.socket_mode, cfg.socket_group)
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        logger.info("serving on unix:%s%s", cfg.socket, f" and {cfg.tcp}" if cfg.tcp else "")

    async def stop(self, grace: float) -> None:
        """No new calls, ``grace`` seconds for those in flight, then the gate."""
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop(grace)
        await self.gate.close()
