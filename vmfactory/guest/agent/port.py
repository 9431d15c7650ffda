"""The agent's ttrpc server on its virtio-serial port.

The port is a character device the agent opens once for its lifetime (a port
admits one guest opener).  Its host side is QEMU's chardev socket, which serves
one host client at a time; the port reports POLLHUP while none is there.

There are no sessions.  The guest cannot tell one host's bytes from the next
one's: a new host's first bytes may be readable before the port reports that it
connected, and a departed host's last bytes after it left.  So the agent serves
one ttrpc connection on the port for its whole life, whoever holds the host end:

* Reading waits while no host is connected, without spinning (POLLHUP is
  level-triggered) and without wake-ups (a template clone's wake-ups dirty
  copy-on-write pages): the port raises SIGIO (O_ASYNC) on every event.
* Answers are queued while no host is connected and sent to the next one.  Host
  clients start their stream ids at random, so answers meant for a previous host
  are dropped as unknown; the queue is bounded, its oldest frames dropped first.
* A departed host's calls run to their end (their answers go nowhere).
* Bytes that break the framing (garbage, or a frame left half sent by a host
  killed mid-write: one still incomplete ``FRAME_TIMEOUT_S`` after its header) end
  that connection; the agent then skips to the next well-formed request for one
  of its services (:func:`resync_offset`) and serves a fresh connection from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import select
import signal
from collections import deque

from vmfactory.proto import ttrpc_pb2 as tpb
from vmfactory.ttrpc import aio
from vmfactory.ttrpc import frames as f

logger = logging.getLogger(__name__)

CHUNK = 64 * 1024
# A safety net only: SIGIO wakes the agent on every port event.
IDLE_RECHECK_S = 60.0
LOW_WATER = 64 * 1024
MAX_QUEUED = 4 << 20     # answers kept for a host that is not there
RESYNC_MAX_REQUEST = 256 * 1024
# Hosts write whole frames at once: one still partial after this was left half sent.
FRAME_TIMEOUT_S = 2.0


def find_port(name: str, sys_root: str = "/sys/class/virtio-ports") -> str:
    """Return the /dev path of the virtio-serial port called ``name``."""
    for entry in sorted(os.listdir(sys_root)):
        try:
            with open(os.path.join(sys_root, entry, "name")) as fh:
                if fh.read().strip() == name:
                    return os.path.join("/dev", entry)
        except FileNotFoundError:
            continue
    raise FileNotFoundError(f"no virtio-serial port named {name!r}")


def host_connected(fd: int) -> bool:
    """Whether the port reports a host on its other end now."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return not any(ev & select.POLLHUP for _, ev in poller.poll(0))


def _is_request(data: bytes, services: frozenset[str]) -> bool:
    req = tpb.Request()
    try:
        req.ParseFromString(data)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends
        return False
    return req.service in services and bool(req.method)


def resync_offset(buf: bytes, services: frozenset[str]) -> tuple[int, bool]:
    """Where to go on after broken framing: (offset, True) when a complete request
    for one of ``services`` starts at offset; else (offset, False): the bytes before
    offset cannot start one, and the rest may once more bytes came."""
    keep = max(0, len(buf) - f.HEADER_SIZE + 1)
    for i in range(len(buf) - f.HEADER_SIZE + 1):
        length, stream_id, type_, _ = f.HEADER.unpack_from(buf, i)
        if type_ != f.REQUEST or stream_id % 2 == 0 or length > RESYNC_MAX_REQUEST:
            continue
        end = i + f.HEADER_SIZE + length
        if end > len(buf):
            keep = min(keep, i)
        elif _is_request(buf[i + f.HEADER_SIZE:end], services):
            return i, True
    return keep, False


class PortChannel:
    """The port as a :class:`vmfactory.ttrpc.aio.Channel` that outlives its hosts."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()  # set by SIGIO: something happened on the port
        self._pushback = b""
        self._out: deque[memoryview] = deque()
        self._queued = 0
        self._writing = False
        self._drained = asyncio.Event()
        self._drained.set()

    def port_event(self) -> None:
        """SIGIO: a host came or went, or data arrived."""
        self._event.set()
        if self._out and not self._writing:
            self._flush()

    def unread(self, data: bytes) -> None:
        """Give ``data`` back: the next read returns it first."""
        self._pushback = data + self._pushback

    async def read(self) -> bytes:
        if self._pushback:
            data, self._pushback = self._pushback, b""
            return data
        while True:
            self._event.clear()
            try:
                data = os.read(self._fd, CHUNK)
            except BlockingIOError:  # a host is there, with nothing to say
                await self._readable()
                continue
            if data:
                return data
            await self._next_event()  # no host and nothing buffered

    async def _readable(self) -> None:
        ready = self._loop.create_future()
        self._loop.add_reader(self._fd, lambda: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            self._loop.remove_reader(self._fd)

    async def _next_event(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), IDLE_RECHECK_S)

    def write(self, data: bytes) -> None:
        self._out.append(memoryview(data))
        self._queued += len(data)
        self._trim()
        if not self._writing:
            self._flush()

    def _trim(self) -> None:
        """Drop the oldest whole frames (never the one half sent) above MAX_QUEUED."""
        dropped = 0
        while self._queued > MAX_QUEUED and len(self._out) > 1:
            frame = self._out[1]
            del self._out[1]
            self._queued -= len(frame)
            dropped += 1
        if dropped:
            logger.warning("no host reads the agent's answers: %d dropped", dropped)

    def _flush(self) -> None:
        while self._out:
            head = self._out[0]
            try:
                n = os.write(self._fd, head[:CHUNK])
            except BlockingIOError:
                # No host (SIGIO resumes us) or a slow one (POLLOUT does).
                self._want_write(host_connected(self._fd))
                return
            except OSError as exc:
                logger.warning("writing to the port failed (%s): %d bytes dropped",
                               errno.errorcode.get(exc.errno or 0, exc), self._queued)
                self._out.clear()
                self._queued = 0
                break
            self._queued -= n
            if n == len(head):
                self._out.popleft()
            else:
                self._out[0] = head[n:]
        self._want_write(False)
        if self._queued <= LOW_WATER:
            self._drained.set()

    def _want_write(self, on: bool) -> None:
        if on and not self._writing:
            self._loop.add_writer(self._fd, self._flush)
        elif not on and self._writing:
            self._loop.remove_writer(self._fd)
        self._writing = on
        if self._queued > LOW_WATER:
            self._drained.clear()

    def buffered(self) -> int:
        return self._queued

    async def drain(self) -> None:
        await self._drained.wait()

    async def close(self) -> None:
        """A connection on the port ended: the port itself stays open."""


class PortServer:
    """Serves ``server`` on the port at ``path`` for the agent's lifetime."""

    def __init__(self, path: str, server: aio.Server) -> None:
        self._server = server
        self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self.resyncs = 0

    async def run(self) -> None:
        """Serve until cancelled."""
        loop = asyncio.get_running_loop()
        channel = PortChannel(self._fd)
        # The handler before O_ASYNC: SIGIO's default action ends the process.
        loop.add_signal_handler(signal.SIGIO, channel.port_event)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGIO})
        fcntl.fcntl(self._fd, fcntl.F_SETOWN, os.getpid())
        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) | os.O_ASYNC)
        try:
            while True:
                rest = await self._server.serve_channel(channel, frame_timeout=FRAME_TIMEOUT_S)
                if rest is None:
                    raise RuntimeError("the port's channel ended")  # read() never ends
                await self._resync(channel, rest)
        finally:
            loop.remove_signal_handler(signal.SIGIO)

    async def _resync(self, channel: PortChannel, buf: bytes) -> None:
        """Skip to the next well-formed request; give it back to the channel."""
        self.resyncs += 1
        skipped = 0
        while True:
            at, found = resync_offset(buf, self._server.services)
            skipped += at
            buf = buf[at:]
            if found:
                break
            buf += await channel.read()
        channel.unread(buf)
        logger.warning("broken framing on the port: skipped %d bytes to the next request "
                       "(resync %d)", skipped, self.resyncs)
