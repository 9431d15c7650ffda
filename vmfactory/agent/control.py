"""Host side of the agent's control channel (see vmfactory.guest.agent.ctlproto)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from typing import Any

from vmfactory.errors import AgentError
from vmfactory.guest.agent import ctlproto

READY_POLL_S = 0.02


class ControlClient:
    """One connection to a VM's control port; calls are serialized."""

    def __init__(self, path: str, call_timeout: float) -> None:
        self.path = path
        self.call_timeout = call_timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ids = itertools.count(int.from_bytes(os.urandom(4), "little") << 16)
        self._lock = asyncio.Lock()
        self._buf = bytearray()

    async def connect(self) -> None:
        try:
            self._reader, self._writer = await asyncio.open_unix_connection(self.path)
        except OSError as exc:
            raise AgentError("control-connect", f"{self.path}: {exc}") from exc

    async def _call(self, name: str, op: int, payload: bytes, timeout: float | None) -> bytes:
        if self._writer is None or self._reader is None:
            raise AgentError(name, "control channel is not connected")
        async with self._lock:
            ident = next(self._ids)
            try:
                self._writer.write(ctlproto.encode(ident, op, payload))
                return await asyncio.wait_for(self._answer(name, ident),
                                              timeout or self.call_timeout)
            except asyncio.TimeoutError as exc:
                raise AgentError(name, f"no answer within {timeout or self.call_timeout:g} s") from exc
            except (OSError, EOFError) as exc:
                raise AgentError(name, f"control channel failed: {exc!r}") from exc

    async def _answer(self, name: str, ident: int) -> bytes:
        assert self._reader is not None
        while True:
            while (frame := ctlproto.decode(self._buf)) is not None:
                got, status, payload = frame
                if got != ident:
                    continue  # a late answer to a call that timed out
                if status != ctlproto.STATUS_OK:
                    raise AgentError(name, payload.decode(errors="replace"))
                return payload
            data = await self._reader.read(65536)
            if not data:
                raise EOFError("control channel closed")
            self._buf += data

    async def ping(self, timeout: float | None = None) -> float:
        """Round trip in seconds."""
        start = time.monotonic()
        token = os.urandom(8)
        if await self._call("control-ping", ctlproto.OP_PING, token, timeout) != token:
            raise AgentError("control-ping", "answered with the wrong token")
        return time.monotonic() - start

    async def status(self, timeout: float | None = None) -> dict[str, Any]:
        """Whether the guest's gRPC server listens, its boot milestones, MemTotal."""
        reply = await self._call("control-status", ctlproto.OP_STATUS, b"", timeout)
        return json.loads(reply)

    async def wait_ready(self, timeout: float) -> dict[str, Any]:
        """Wait until the agent answers here and its gRPC server listens; its status."""
        deadline = time.monotonic() + timeout
        # One ping with the whole budget: the frame waits in the port until the
        # guest's control loop opens it.
        try:
            await self.ping(timeout=timeout)
        except AgentError as exc:
            raise AgentError("wait-ready", str(exc).split(": ", 1)[-1]) from exc
        while not (status := await self.status(max(0.01, deadline - time.monotonic())))["grpc"]:
            if time.monotonic() > deadline:
                raise AgentError("wait-ready", f"gRPC server not up within {timeout:g} s")
            await asyncio.sleep(READY_POLL_S)
        return status

    async def activate(self, entropy: bytes, unix_ns: int | None = None,
                       timeout: float | None = None) -> bool:
        """Reseed the guest RNG with ``entropy`` and set its clock; True if reseeded."""
        payload = ctlproto.activate_payload(unix_ns or time.time_ns(), entropy)
        reply = await self._call("activate", ctlproto.OP_ACTIVATE, payload, timeout)
        return reply == b"\x01"

    async def close(self) -> None:
        if self._writer is not None:
            writer, self._writer, self._reader = self._writer, None, None
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass
