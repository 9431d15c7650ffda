"""The checksum envelope every backend wraps record values in.

Layout (all integers big-endian)::

    offset  size  field
    0       4     magic  b"VMFR"
    4       1     format version (1)
    5       3     reserved, zero
    8       8     payload length
    16      4     CRC-32 of bytes 0..15 followed by the payload
    20      n     payload

A truncated, extended or garbled record fails :func:`decode_record` with
:class:`EnvelopeError`; the backend then quarantines it and raises
:class:`~vmfactory.store.errors.CorruptRecord`.
"""

from __future__ import annotations

import struct
import zlib

__all__ = ["HEADER_SIZE", "MAGIC", "VERSION", "EnvelopeError", "decode_record", "encode_record"]

MAGIC = b"VMFR"
VERSION = 1
_PREFIX = struct.Struct(">4sB3xQ")
_CRC = struct.Struct(">I")
HEADER_SIZE = _PREFIX.size + _CRC.size


class EnvelopeError(ValueError):
    """Raw record bytes are not a valid envelope.  Internal to the backends."""


def _checksum(prefix: bytes, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(prefix)) & 0xFFFFFFFF


def encode_record(payload: bytes) -> bytes:
    """Wrap ``payload`` in the envelope."""
    prefix = _PREFIX.pack(MAGIC, VERSION, len(payload))
    return b"".join((prefix, _CRC.pack(_checksum(prefix, payload)), payload))


def decode_record(data: bytes) -> bytes:
    """Check the envelope in ``data`` and return the payload.

    Raises :class:`EnvelopeError` with a short reason if anything is off.
    """
    if len(data) < HEADER_SIZE:
        raise EnvelopeError(f"truncated header ({len(data)} of {HEADER_SIZE} bytes)")
    prefix = data[: _PREFIX.size]
    magic, version, length = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise EnvelopeError(f"bad magic {magic!r}")
    if version != VERSION:
        raise EnvelopeError(f"unsupported format version {version}")
    if prefix[5:8] != b"\0\0\0":
        raise EnvelopeError("reserved header bytes are not zero")
    (crc,) = _CRC.unpack_from(data, _PREFIX.size)
    payload = data[HEADER_SIZE:]
    if len(payload) != length:
        raise EnvelopeError(f"length mismatch (header says {length}, found {len(payload)})")
    if _checksum(prefix, payload) != crc:
        raise EnvelopeError("checksum mismatch")
    return bytes(payload)
