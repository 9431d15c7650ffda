"""What a ttrpc server connection reads and writes: a :class:`Channel` (a stream
socket's, or one a transport of its own provides, such as a virtio-serial port)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

READ_CHUNK = 64 * 1024


class Channel(Protocol):
    """What a server connection needs of its bytes: read, write, close."""

    async def read(self) -> bytes:
        """The next bytes; b"" once the peer is gone."""

    def write(self, data: bytes) -> None:
        """Queue ``data`` (never blocks)."""

    def buffered(self) -> int:
        """Bytes queued and not yet written."""

    async def drain(self) -> None:
        """Wait until the queue is short again."""

    async def close(self) -> None:
        """Close; idempotent."""


class StreamChannel:
    """A :class:`Channel` over an asyncio stream pair (unix or TCP socket)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer

    async def read(self) -> bytes:
        return await self._reader.read(READ_CHUNK)

    def write(self, data: bytes) -> None:
        self._writer.write(data)

    def buffered(self) -> int:
        return self._writer.transport.get_write_buffer_size()

    async def drain(self) -> None:
        await self._writer.drain()

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(Exception):
            await asyncio.shield(self._writer.wait_closed())
