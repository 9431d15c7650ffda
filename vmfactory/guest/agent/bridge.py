"""Relay between the virtio-serial port and the agent's local gRPC socket.

gRPC cannot serve on a character device, so the agent's server listens on a
unix socket inside the guest and this bridge carries bytes between it and the
port.  One host session maps to one local connection: when the host goes away
the local connection is closed, so the next host starts a fresh HTTP/2 session.

While no host is connected the bridge must block, not spin: a template clone
shares its memory copy-on-write, and every wake-up dirties pages.  The port
reports POLLHUP continuously while the host is away, so poll() cannot be used
to wait for it; instead the port raises SIGIO (O_ASYNC) when the host side
opens, and the bridge sleeps in sigtimedwait().  SIGIO must be blocked in every
thread before any thread starts (see ``__main__``).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import signal
import socket
import threading
import time

logger = logging.getLogger(__name__)

CHUNK = 64 * 1024
MAX_BUFFER = 1024 * 1024
# A safety net only: SIGIO wakes the bridge on host connect.
IDLE_RECHECK_S = 60.0
FLUSH_TIMEOUT_S = 1.0
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
RECENT_MAX = 256 * 1024


def find_port(name: str, sys_root: str = "/sys/class/virtio-ports") -> str:
    """Return the /dev path of the virtio-serial port called ``name``."""
    for entry in sorted(os.listdir(sys_root)):
        try:
            with open(os.path.join(sys_root, entry, "name")) as f:
                if f.read().strip() == name:
                    return os.path.join("/dev", entry)
        except FileNotFoundError:
            continue
    raise FileNotFoundError(f"no virtio-serial port named {name!r}")


class PortBridge:
    """Relays one host session at a time between ``port_path`` and ``local_path``."""

    def __init__(self, port_path: str, local_path: str) -> None:
        self._local_path = local_path
        # Opened once for the agent's lifetime: a virtio port admits one opener.
        self._port = os.open(port_path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        fcntl.fcntl(self._port, fcntl.F_SETOWN, os.getpid())
        flags = fcntl.fcntl(self._port, fcntl.F_GETFL)
        fcntl.fcntl(self._port, fcntl.F_SETFL, flags | os.O_ASYNC)
        self.sessions = 0

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="port-bridge", daemon=True)
        thread.start()
        return thread

    def run(self) -> None:
        carry = b""
        while True:
            self._wait_for_host()
            self.sessions += 1
            try:
                carry, reason = self._session(carry)
            except OSError as exc:
                carry, reason = b"", str(exc)
            logger.info("host session %d ended: %s", self.sessions, reason)

    def _host_connected(self) -> bool:
        poller = select.poll()
        poller.register(self._port, select.POLLIN)
        events = poller.poll(0)
        return not any(ev & select.POLLHUP for _, ev in events)

    def _wait_for_host(self) -> None:
        while not self._host_connected():
            signal.sigtimedwait({signal.SIGIO}, IDLE_RECHECK_S)

    def _session(self, carry: bytes) -> tuple[bytes, str]:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(self._local_path)
            conn.setblocking(False)
            relay = _Relay(self._port, conn, carry)
            reason = relay.run()
            return relay.carry_over, reason
        finally:
            conn.close()


class _Relay:
    """Moves bytes both ways until either side hangs up.

    Session boundaries come from HTTP/2 itself: every client connection opens
    with PREFACE.  A relay forwards nothing from the host until it has seen one
    (stale bytes of a previous host are dropped).  When a new host connects so
    quickly that the bridge never saw the old one leave, the new preface reaches
    the old server mid-stream and it hangs up; the relay then hands the new
    host's bytes, from its preface on, to the next local session, so the new
    client never notices.
    """

    def __init__(self, port: int, conn: socket.socket, carry: bytes) -> None:
        self.port = port
        self.conn = conn
        self.synced = bool(carry)
        self.to_conn = bytearray(carry)
        self.to_port = bytearray()
        self.unsynced = bytearray()
        self.recent = bytearray()  # tail of what reached the local server
        self.recent_start = 0  # stream offset of recent[0]
        self.carry_over = b""

    def run(self) -> str:
        """Relay until one side leaves; return which."""
        cfd = self.conn.fileno()
        while True:
            poller = select.poll()
            poller.register(self.port, self._mask(self.to_conn, self.to_port))
            poller.register(cfd, self._mask(self.to_port, self.to_conn))
            for fd, ev in poller.poll():
                if fd == self.port and not self._port_event(ev):
                    return "host left"
                if fd == cfd and not self._conn_event(ev):
                    return self._local_closed()

    def _local_closed(self) -> str:
        at = self.recent.rfind(PREFACE)
        if at >= 0 and self.recent_start + at > 0:
            self.carry_over = bytes(self.recent[at:] + self.to_conn)
            return "new host preface mid-session: handed to a fresh session"
        self._flush_port()
        return "local server closed"

    def _flush_port(self) -> None:
        """Deliver the local server's last words (a GOAWAY) so the host reconnects."""
        deadline = time.monotonic() + FLUSH_TIMEOUT_S
        while self.to_port and time.monotonic() < deadline:
            poller = select.poll()
            poller.register(self.port, select.POLLOUT)
            events = poller.poll(int(FLUSH_TIMEOUT_S * 1000))
            if not events or any(ev & select.POLLHUP for _, ev in events):
                return
            del self.to_port[:_write(self.port, self.to_port)]

    @staticmethod
    def _mask(inbound: bytearray, outbound: bytearray) -> int:
        mask = select.POLLIN if len(inbound) < MAX_BUFFER else 0
        return mask | (select.POLLOUT if outbound else 0)

    def _from_host(self, data: bytes) -> None:
        if self.synced:
            self.to_conn += data
            return
        self.unsynced += data
        at = self.unsynced.find(PREFACE)
        if at < 0:
            del self.unsynced[:-(len(PREFACE) - 1)]
            return
        self.synced = True
        self.to_conn += self.unsynced[at:]
        self.unsynced.clear()

    def _port_event(self, ev: int) -> bool:
        if ev & (select.POLLHUP | select.POLLERR):
            return False  # host went away: drop the session
        if ev & select.POLLIN:
            data = _read(self.port)
            if data == b"":
                return False
            if data:
                self._from_host(data)
        if ev & select.POLLOUT and self.to_port:
            del self.to_port[:_write(self.port, self.to_port)]
        return True

    def _conn_event(self, ev: int) -> bool:
        if ev & select.POLLIN:
            data = self.conn.recv(CHUNK)
            if not data:
                return False
            self.to_port += data
        elif ev & (select.POLLHUP | select.POLLERR):
            return False
        if ev & select.POLLOUT and self.to_conn:
            sent = self.conn.send(self.to_conn)
            self.recent += self.to_conn[:sent]
            del self.to_conn[:sent]
            if len(self.recent) > RECENT_MAX:
                trim = len(self.recent) - RECENT_MAX
                del self.recent[:trim]
                self.recent_start += trim
        return True


def _read(fd: int) -> bytes | None:
    try:
        return os.read(fd, CHUNK)
    except OSError as exc:
        if exc.errno == errno.EAGAIN:
            return None
        raise


def _write(fd: int, data: bytearray) -> int:
    try:
        return os.write(fd, data[:CHUNK])
    except OSError as exc:
        if exc.errno == errno.EAGAIN:
            return 0
        raise
