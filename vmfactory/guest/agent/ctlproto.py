"""The agent's control channel: a tiny framed protocol for the handout hot path.

gRPC through the Python agent costs ~20-30 ms a call under TCG; a handout needs
"are you alive, take this entropy, here is the time" in about a millisecond.
So a second virtio-serial port carries fixed frames, answered by a small loop
outside the gRPC server.  Shared by the guest (server) and the host (client);
standard library only.

Request:  MAGIC(8) id(u64) op(u8) length(u32) payload
Reply:    MAGIC(8) id(u64) status(u8) length(u32) payload
A reader that meets bytes that are not a frame skips to the next MAGIC, so a
stale half-frame from an earlier host cannot wedge the channel.
"""

from __future__ import annotations

import struct

MAGIC = b"VMFCTL01"
HEADER = struct.Struct("<8sQBI")
MAX_PAYLOAD = 4096

OP_PING = 1
# payload: time_unix_ns (i64) + entropy bytes; reseeds the RNG, then sets the clock.
OP_ACTIVATE = 2
# reply: JSON {"grpc": bool, "boot": {...milestones...}, "mem_total_kib": int}
OP_STATUS = 3

STATUS_OK = 0
STATUS_ERROR = 1

CONTROL_PORT_NAME = "vmfactory.ctl"
# Written by the agent once its gRPC server listens: the boot milestones, as JSON.
READY_FILE = "/run/vmfactory-agent.ready"


def encode(ident: int, code: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(MAGIC, ident, code, len(payload)) + payload


def decode(buf: bytearray) -> tuple[int, int, bytes] | None:
    """Take one frame off the front of ``buf`` (id, code, payload), or None if
    none is complete yet; bytes before a MAGIC are dropped."""
    start = buf.find(MAGIC)
    if start < 0:
        del buf[:max(0, len(buf) - len(MAGIC) + 1)]
        return None
    del buf[:start]
    if len(buf) < HEADER.size:
        return None
    _, ident, code, length = HEADER.unpack_from(buf)
    if length > MAX_PAYLOAD:
        del buf[:len(MAGIC)]  # not a real frame: resync on the next MAGIC
        return decode(buf)
    end = HEADER.size + length
    if len(buf) < end:
        return None
    payload = bytes(buf[HEADER.size:end])
    del buf[:end]
    return ident, code, payload


def activate_payload(time_unix_ns: int, entropy: bytes) -> bytes:
    return struct.pack("<q", time_unix_ns) + entropy


def parse_activate(payload: bytes) -> tuple[int, bytes]:
    (time_unix_ns,) = struct.unpack_from("<q", payload)
    return time_unix_ns, payload[8:]
