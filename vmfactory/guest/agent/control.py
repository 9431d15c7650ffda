"""The guest side of the control channel: a blocking loop in its own process.

Like the agent's port server it sleeps (in sigtimedwait()) while no host is connected (no
wake-ups, no dirtied pages in clones) and answers frames with plain syscalls.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import select
import signal

from vmfactory.guest.agent import ctlproto
from vmfactory.guest.agent.platform import GuestPlatform, Platform, read_meminfo

logger = logging.getLogger(__name__)

IDLE_RECHECK_S = 60.0


class ControlServer:
    """Serves ctlproto frames on one virtio-serial port."""

    def __init__(self, port_path: str, platform: Platform | None = None) -> None:
        self._port = os.open(port_path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        fcntl.fcntl(self._port, fcntl.F_SETOWN, os.getpid())
        flags = fcntl.fcntl(self._port, fcntl.F_GETFL)
        fcntl.fcntl(self._port, fcntl.F_SETFL, flags | os.O_ASYNC)
        self._platform = platform or GuestPlatform()
        self._buf = bytearray()

    def run(self) -> None:
        poller = select.poll()
        poller.register(self._port, select.POLLIN)
        while True:
            events = poller.poll()
            if any(ev & select.POLLHUP for _, ev in events):
                self._buf.clear()  # whatever the old host left half-sent
                signal.sigtimedwait({signal.SIGIO}, IDLE_RECHECK_S)
                continue
            try:
                data = os.read(self._port, 65536)
            except OSError as exc:
                if exc.errno == errno.EAGAIN:
                    continue
                raise
            self._buf += data
            while (frame := ctlproto.decode(self._buf)) is not None:
                self._reply(*self._handle(*frame))

    def _handle(self, ident: int, op: int, payload: bytes) -> tuple[int, int, bytes]:
        try:
            if op == ctlproto.OP_PING:
                return ident, ctlproto.STATUS_OK, payload
            if op == ctlproto.OP_STATUS:
                return ident, ctlproto.STATUS_OK, _status()
            if op == ctlproto.OP_ACTIVATE:
                time_ns, entropy = ctlproto.parse_activate(payload)
                reseeded = False
                if entropy:  # empty: the clock only (the RNG was reseeded earlier)
                    reseeded = self._platform.reseed(entropy, 8 * len(entropy)).reseeded
                self._platform.set_time(time_ns)
                return ident, ctlproto.STATUS_OK, bytes([reseeded])
            return ident, ctlproto.STATUS_ERROR, f"unknown op {op}".encode()
        except (OSError, ValueError) as exc:
            return ident, ctlproto.STATUS_ERROR, str(exc).encode()[:ctlproto.MAX_PAYLOAD]

    def _reply(self, ident: int, status: int, payload: bytes) -> None:
        frame = ctlproto.encode(ident, status, payload)
        poller = select.poll()
        poller.register(self._port, select.POLLOUT)
        while frame:
            events = poller.poll(1000)
            if not events or any(ev & select.POLLHUP for _, ev in events):
                return  # host gone: the reply has no one to go to
            try:
                frame = frame[os.write(self._port, frame):]
            except OSError as exc:
                if exc.errno != errno.EAGAIN:
                    raise


def _status() -> bytes:
    """Whether the gRPC server listens yet, its boot milestones, and MemTotal."""
    try:
        with open(ctlproto.READY_FILE) as f:
            boot = json.load(f)
    except (OSError, ValueError):
        boot = None
    return json.dumps({"grpc": boot is not None, "boot": boot or {},
                       "mem_total_kib": read_meminfo().get("MemTotal", 0)}).encode()
