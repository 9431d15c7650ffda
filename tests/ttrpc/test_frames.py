"""The ttrpc frame format: header layout, decoding however the bytes are split,
oversize frames refused at their header, unknown types skipped (no I/O)."""

from __future__ import annotations

import struct

import pytest

from vmfactory.ttrpc import frames as f


def test_the_header_is_ten_big_endian_bytes() -> None:
    raw = f.encode(0x01020304, f.REQUEST, f.FLAG_REMOTE_OPEN, b"xy")
    assert raw == b"\x00\x00\x00\x02" + b"\x01\x02\x03\x04" + b"\x01\x02" + b"xy"
    assert f.HEADER_SIZE == 10


def test_frames_split_at_every_byte_boundary_decode_the_same() -> None:
    stream = b"".join([f.encode(1, f.REQUEST, 0, b"hello"), f.encode(3, f.DATA, 1, b""),
                       f.encode(1, f.RESPONSE, 0, bytes(range(256)) * 3)])
    whole = f.Decoder().feed(stream)
    assert [(x.stream_id, x.type, x.flags, len(x.data)) for x in whole] == \
        [(1, f.REQUEST, 0, 5), (3, f.DATA, 1, 0), (1, f.RESPONSE, 0, 768)]
    for cut in range(len(stream) + 1):
        d = f.Decoder()
        assert d.feed(stream[:cut]) + d.feed(stream[cut:]) == whole, cut
    d = f.Decoder()
    one_by_one = [frame for i in range(len(stream)) for frame in d.feed(stream[i:i + 1])]
    assert one_by_one == whole and d.pending == 0


def test_an_oversize_frame_is_refused_at_its_header() -> None:
    header = struct.pack(">IIBB", f.MAX_DATA + 1, 1, f.REQUEST, 0)
    with pytest.raises(f.ProtocolError, match="over"):
        f.Decoder().feed(header)  # no data needed: the length alone says it
    with pytest.raises(f.ProtocolError):
        f.encode(1, f.REQUEST, 0, b"x" * (f.MAX_DATA + 1))
    assert len(f.Decoder().feed(f.encode(1, f.DATA, 0, b"x" * f.MAX_DATA))[0].data) == f.MAX_DATA


def test_unknown_types_are_skipped_with_their_data() -> None:
    d = f.Decoder()
    frames = d.feed(struct.pack(">IIBB", 3, 1, 0x7F, 0) + b"abc" + f.encode(1, f.DATA, 0, b"ok"))
    assert [(x.type, x.data) for x in frames] == [(f.DATA, b"ok")]
    assert d.skipped == 1


def test_a_half_frame_stays_pending() -> None:
    d = f.Decoder()
    raw = f.encode(5, f.REQUEST, 0, b"abcdef")
    assert d.feed(raw[:12]) == [] and d.pending == 12


def test_rpc_errors_name_their_code() -> None:
    err = f.RpcError(f.NOT_FOUND, "no such thing")
    assert str(err) == "NOT_FOUND: no such thing" and err.code == 5
