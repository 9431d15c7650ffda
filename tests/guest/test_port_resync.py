"""Where the agent's port server goes on after broken framing (port.resync_offset):
the next complete, well-formed request for one of its services, wherever it starts."""

from __future__ import annotations

import os

from vmfactory.guest.agent.port import RESYNC_MAX_REQUEST, resync_offset
from vmfactory.proto import ttrpc_pb2 as tpb
from vmfactory.ttrpc import frames as f

SERVICES = frozenset({"vmfactory.agent.v1.Agent"})


def request(stream_id: int = 7, service: str = "vmfactory.agent.v1.Agent") -> bytes:
    body = tpb.Request(service=service, method="Ping", payload=b"\x08\x01").SerializeToString()
    return f.encode(stream_id, f.REQUEST, 0, body)


def test_a_request_after_garbage_is_found_at_its_first_byte() -> None:
    for garbage in (b"", b"x", os.urandom(1000), request()[:13], b"\0" * 64):
        assert resync_offset(garbage + request(), SERVICES) == (len(garbage), True)


def test_frames_that_are_not_requests_for_our_services_are_skipped() -> None:
    skipped = [f.encode(8, f.REQUEST, 0, request()[10:]),  # even stream id
               f.encode(7, f.DATA, 0, b"stdin"),  # not a request
               request(service="other.Service"),  # a service we do not serve
               f.encode(7, f.REQUEST, 0, b"\xff\xff")]  # not a Request message
    buf = b"".join(skipped) + request(9)
    at, found = resync_offset(buf, SERVICES)
    assert found and buf[at:] == request(9)


def test_a_request_still_arriving_is_waited_for_and_nothing_before_it_is_kept() -> None:
    whole = request()
    buf = os.urandom(50).replace(b"\x01", b"\x02") + whole[:-3]
    at, found = resync_offset(buf, SERVICES)
    assert not found and buf[at:] == whole[:-3]
    at, found = resync_offset(buf[at:] + whole[-3:], SERVICES)
    assert (at, found) == (0, True)


def test_a_header_promising_too_much_does_not_hold_up_what_follows() -> None:
    big = f.HEADER.pack(RESYNC_MAX_REQUEST + 1, 7, f.REQUEST, 0)
    assert resync_offset(big + request(), SERVICES) == (len(big), True)
    # A plausible header whose data never comes does not hide a request after it.
    pending = f.HEADER.pack(5000, 7, f.REQUEST, 0) + b"abc"
    assert resync_offset(pending + request(), SERVICES) == (len(pending), True)


def test_without_a_request_only_a_possible_header_tail_is_kept() -> None:
    buf = b"\x05" * 100
    at, found = resync_offset(buf, SERVICES)
    assert not found and len(buf) - at == f.HEADER_SIZE - 1
