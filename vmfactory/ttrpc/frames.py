"""The ttrpc wire format: frames and the envelope messages they carry.

A frame is a 10-byte header (data length and stream id, big-endian 32-bit;
message type and flags, one byte each) and up to 4 MiB of data.  Requests and
responses carry a ``Request``/``Response`` protobuf (vmfactory/proto/ttrpc.proto,
wire-compatible with containerd's); data frames carry a stream's messages.
Status codes are gRPC's (google.rpc.Code).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

HEADER = struct.Struct(">IIBB")
HEADER_SIZE = HEADER.size  # 10
MAX_DATA = 4 << 20

REQUEST = 0x01
RESPONSE = 0x02
DATA = 0x03
# vmfactory's extension (not in ttrpc's PROTOCOL.md): the client gave up on this
# stream, so the server may stop its handler.  A peer without it skips the frame
# as any unknown type; nothing is answered.
CANCEL = 0x10
KNOWN_TYPES = frozenset({REQUEST, RESPONSE, DATA, CANCEL})

FLAG_REMOTE_CLOSED = 0x01  # request, data: the sender sends no more on this stream
FLAG_REMOTE_OPEN = 0x02    # request: the sender goes on sending data frames
FLAG_NO_DATA = 0x04        # data: this frame carries no message (only the flag matters)

# google.rpc.Code, as gRPC numbers them
OK, CANCELLED, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED, NOT_FOUND = 0, 1, 2, 3, 4, 5
ALREADY_EXISTS, PERMISSION_DENIED, RESOURCE_EXHAUSTED, FAILED_PRECONDITION = 6, 7, 8, 9
ABORTED, OUT_OF_RANGE, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS = 10, 11, 12, 13, 14, 15
CODE_NAMES = {0: "OK", 1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT",
              4: "DEADLINE_EXCEEDED", 5: "NOT_FOUND", 6: "ALREADY_EXISTS",
              7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED", 9: "FAILED_PRECONDITION",
              10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED", 13: "INTERNAL",
              14: "UNAVAILABLE", 15: "DATA_LOSS", 16: "UNAUTHENTICATED"}


class TtrpcError(Exception):
    """Anything the ttrpc package raises."""


class ProtocolError(TtrpcError):
    """The peer broke the framing: the connection cannot be trusted any more."""


class ConnectionLost(TtrpcError):
    """The connection ended while a call was outstanding."""


class RpcError(TtrpcError):
    """The server answered with a status other than OK.  ``details``: short
    key/value strings carried beside the status (as ``google.protobuf.Any``
    entries of type ``DETAIL_TYPE`` + key), for errors that must keep their
    kind across the wire."""

    def __init__(self, code: int, message: str,
                 details: Mapping[str, str] | None = None) -> None:
        super().__init__(f"{CODE_NAMES.get(code, str(code))}: {message}")
        self.code = code
        self.message = message
        self.details = dict(details or {})


DETAIL_TYPE = "type.vmfactory.dev/detail/"


def details_of(status: Any) -> dict[str, str]:
    """The vmfactory key/value details of a ``Status`` message (others are ignored)."""
    out = {}
    for any_ in status.details:
        if any_.type_url.startswith(DETAIL_TYPE):
            out[any_.type_url[len(DETAIL_TYPE):]] = any_.value.decode(errors="replace")
    return out


@dataclass(frozen=True)
class Frame:
    stream_id: int
    type: int
    flags: int
    data: bytes


def encode(stream_id: int, type_: int, flags: int, data: bytes) -> bytes:
    """One frame; ProtocolError for data over MAX_DATA (nobody may send it)."""
    if len(data) > MAX_DATA:
        raise ProtocolError(f"frame data of {len(data)} bytes is over the {MAX_DATA} limit")
    return HEADER.pack(len(data), stream_id, type_, flags) + data


class Decoder:
    """Bytes in, whole frames out, however the bytes were split.

    An oversize length is refused as soon as its header is read (before its
    data would be buffered); frames of an unknown type are skipped, their data
    included, so a newer peer's extensions do not break the connection."""

    def __init__(self, max_data: int = MAX_DATA) -> None:
        self._buf = bytearray()
        self._max = max_data
        self.skipped = 0  # frames of unknown types dropped so far

    def feed(self, chunk: bytes) -> list[Frame]:
        self._buf += chunk
        frames = []
        while len(self._buf) >= HEADER_SIZE:
            length, stream_id, type_, flags = HEADER.unpack_from(self._buf)
            if length > self._max:
                raise ProtocolError(f"frame of {length} bytes is over the {self._max} limit")
            if len(self._buf) < HEADER_SIZE + length:
                break
            data = bytes(self._buf[HEADER_SIZE:HEADER_SIZE + length])
            del self._buf[:HEADER_SIZE + length]
            if type_ in KNOWN_TYPES:
                frames.append(Frame(stream_id, type_, flags, data))
            else:
                self.skipped += 1
        return frames

    def take(self) -> bytes:
        """The bytes not decoded yet, removed from the decoder."""
        rest, self._buf = bytes(self._buf), bytearray()
        return rest

    @property
    def pending(self) -> int:
        """Bytes of a frame not yet complete (a peer gone now left it half sent)."""
        return len(self._buf)
