"""The daemon's public unix socket, and who is on each connection.

grpcio does not tell a servicer who is on the other end of a unix socket, so
the daemon serves the public socket itself: :class:`PeerGate` accepts each
connection, reads its peer credentials (``SO_PEERCRED``: uid, gid, pid) and
relays its bytes to the gRPC server's private socket from a client socket
bound to a path of its own.  gRPC reports that path as the call's peer
(``context.peer()``), and :meth:`PeerGate.caller` maps it back to the
credentials.  The private socket and the bound paths live in a directory only
root may enter, so nobody can connect there with a path of their choosing.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import socket
import struct
from pathlib import Path

from vmfactory.daemon.callers import Caller
from vmfactory.util.tasks import finish

logger = logging.getLogger(__name__)

CHUNK = 256 * 1024
UCRED = struct.Struct("3i")  # pid, uid, gid


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected ``sock``."""
    return UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size))


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, then half-close the other side."""
    while data := await reader.read(CHUNK):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


class PeerGate:
    """Serves ``public`` and relays every connection to the gRPC server at
    ``private`` (``<state>/grpc.sock``), at most ``max_connections`` at a time."""

    def __init__(self, public: Path, state: Path, max_connections: int) -> None:
        self.public = public
        self.state = state
        self.max_connections = max_connections
        self._server: asyncio.base_events.Server | None = None
        self._callers: dict[str, Caller] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)

    @property
    def private(self) -> Path:
        return self.state / "grpc.sock"

    @property
    def address(self) -> str:
        """Where the gRPC server listens (only the gate connects there)."""
        return f"unix:{self.private}"

    def prepare(self) -> None:
        """The private directory, empty and root's alone; call before the gRPC
        server binds ``address``."""
        shutil.rmtree(self.state, ignore_errors=True)
        (self.state / "peers").mkdir(mode=0o700, parents=True)
        os.chmod(self.state, 0o700)

    async def start(self) -> None:
        """Listen on ``public`` (the caller secures its mode and group)."""
        self._server = await asyncio.start_unix_server(self._serve, str(self.public))

    def caller(self, peer: str) -> Caller | None:
        """The credentials behind gRPC's ``context.peer()``, if it came through here."""
        return self._callers.get(peer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if len(self._tasks) > self.max_connections:
                logger.warning("refusing a connection: %d open", len(self._tasks) - 1)
                return
            pid, uid, gid = peer_credentials(writer.get_extra_info("socket"))
            await self._relay(reader, writer, Caller.of_process(pid, uid, gid))
        except (ConnectionError, OSError) as exc:
            logger.debug("connection ended: %s", exc)
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     caller: Caller) -> None:
        path = self.state / "peers" / str(next(self._ids))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, str(self.private))
            up_reader, up_writer = await asyncio.open_unix_connection(sock=sock)
        except BaseException:
            sock.close()
            path.unlink(missing_ok=True)
            raise
        self._callers[f"unix:{path}"] = caller
        pumps = [asyncio.ensure_future(_pump(reader, up_writer)),
                 asyncio.ensure_future(_pump(up_reader, writer))]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for pump in pumps:
                pump.cancel()
            await finish(asyncio.gather(*pumps, return_exceptions=True))
            self._callers.pop(f"unix:{path}", None)
            up_writer.close()
            path.unlink(missing_ok=True)

    async def close(self) -> None:
        """Stop accepting, end every relayed connection, remove the socket files;
        idempotent."""
        if self._server is not None:
            server, self._server = self._server, None
            server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await finish(asyncio.gather(*tasks, return_exceptions=True))
        self.public.unlink(missing_ok=True)
        shutil.rmtree(self.state, ignore_errors=True)
