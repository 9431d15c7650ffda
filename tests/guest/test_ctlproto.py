"""The control-channel framing: round trips, resync after junk, partial frames."""

from __future__ import annotations

from hypothesis import given, strategies as st

from vmfactory.guest.agent import ctlproto


@given(st.integers(0, 2**64 - 1), st.integers(0, 255), st.binary(max_size=ctlproto.MAX_PAYLOAD))
def test_round_trip(ident: int, code: int, payload: bytes) -> None:
    buf = bytearray(ctlproto.encode(ident, code, payload))
    assert ctlproto.decode(buf) == (ident, code, payload)
    assert buf == bytearray()


@given(st.binary(max_size=200).filter(lambda b: ctlproto.MAGIC not in b), st.binary(max_size=64))
def test_junk_before_a_frame_is_skipped(junk: bytes, payload: bytes) -> None:
    buf = bytearray(junk + ctlproto.encode(7, ctlproto.OP_PING, payload))
    assert ctlproto.decode(buf) == (7, ctlproto.OP_PING, payload)


def test_partial_frame_waits_for_the_rest() -> None:
    frame = ctlproto.encode(1, ctlproto.OP_PING, b"abcdef")
    buf = bytearray(frame[:10])
    assert ctlproto.decode(buf) is None
    buf += frame[10:]
    assert ctlproto.decode(buf) == (1, ctlproto.OP_PING, b"abcdef")


def test_oversized_length_resyncs_on_the_next_magic() -> None:
    bogus = ctlproto.HEADER.pack(ctlproto.MAGIC, 1, 1, ctlproto.MAX_PAYLOAD + 1)
    good = ctlproto.encode(2, ctlproto.OP_PING, b"ok")
    buf = bytearray(bogus + good)
    assert ctlproto.decode(buf) == (2, ctlproto.OP_PING, b"ok")


def test_activate_payload_round_trip() -> None:
    payload = ctlproto.activate_payload(123456789, b"\x01" * 32)
    assert ctlproto.parse_activate(payload) == (123456789, b"\x01" * 32)
