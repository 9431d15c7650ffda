"""The agent's host sessions on its virtio-serial port (guest/agent/port.py), in a
real VM: hosts that leave mid-frame, send garbage or reconnect at once must not
cost the next host its answers."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import AsyncIterator

import pytest

from vmfactory.agent import AgentClient
from vmfactory.config import Config
from vmfactory.factory.direct import DirectFactory
from vmfactory.guest.image import GuestImage
from vmfactory.hypervisor.qemu import QemuHypervisor, QemuVm
from vmfactory.proto import agent_pb2 as pb
from vmfactory.proto import ttrpc_pb2 as tpb
from vmfactory.ttrpc import frames as f

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
async def vm(config: Config, guest_image: GuestImage) -> AsyncIterator[QemuVm]:
    factory = DirectFactory(config, QemuHypervisor(config.paths.run_dir, config.timeouts))
    machine = await factory.get_vm()
    await machine.disconnect_agent()  # the socket is the tests' from here on
    yield machine
    await machine.stop()


def ping_frame(stream_id: int, token: int) -> bytes:
    req = tpb.Request(service="vmfactory.agent.v1.Agent", method="Ping",
                      payload=pb.PingRequest(token=token).SerializeToString())
    return f.encode(stream_id, f.REQUEST, 0, req.SerializeToString())


def send_and_leave(path: str, data: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        s.sendall(data)


async def answers(vm: QemuVm, within: float = 30) -> float:
    """Seconds until a fresh client's ping is answered, with its own token."""
    client = AgentClient(f"unix:{vm.agent_socket}", call_timeout=5)
    try:
        waited = await client.wait_ready(within)
        assert (await client.info(0)).platform == "guest"
        return waited
    finally:
        await client.close()


async def test_a_host_gone_mid_frame_does_not_cost_the_next_one(vm: QemuVm) -> None:
    frame = ping_frame(1, 1)
    send_and_leave(str(vm.agent_socket), frame[:len(frame) // 2])
    assert await answers(vm) < 20
    # A header that promises 1 MiB and delivers 3 bytes.
    send_and_leave(str(vm.agent_socket), struct.pack(">IIBB", 1 << 20, 1, f.REQUEST, 0) + b"abc")
    assert await answers(vm) < 20


@pytest.mark.parametrize("garbage", [
    b"\xff" * 64,  # a length over the limit
    f.encode(2, f.REQUEST, 0, b""),  # an even (server-side) stream id
    f.encode(1, f.RESPONSE, 0, b"\x01"),  # a response from a client
    f.encode(1, f.REQUEST, 0, b"\xff\xff\xff"),  # an undecodable request
])
async def test_garbage_from_a_host_leaves_the_agent_serving(vm: QemuVm, garbage: bytes) -> None:
    send_and_leave(str(vm.agent_socket), garbage)
    assert await answers(vm) < 20


async def test_back_to_back_hosts_get_their_own_answers(vm: QemuVm) -> None:
    """Each host leaves with pings unanswered; the next connects at once, and its
    answers must be its own (AgentClient checks every token)."""
    slowest = 0.0
    for i in range(15):
        send_and_leave(str(vm.agent_socket), b"".join(ping_frame(1 + 2 * k, 1000 * i + k)
                                                      for k in range(5)))
        t0 = time.monotonic()
        await answers(vm)
        slowest = max(slowest, time.monotonic() - t0)
    assert slowest < 20


async def test_many_calls_on_one_session(vm: QemuVm) -> None:
    client = AgentClient(f"unix:{vm.agent_socket}", call_timeout=10)
    try:
        await client.wait_ready(30)
        replies = await asyncio.gather(*(client.ping() for _ in range(50)))
        assert len({r.agent_version for r in replies}) == 1
        infos = await asyncio.gather(*(client.info(16) for _ in range(10)))
        assert len({i.random for i in infos}) == 10
    finally:
        await client.close()
