"""containerd's Go ttrpc client (see test_interop) calling the agent in a real VM:
over the virtio-serial port, the port server's sessions, then a Python client."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.ttrpc.test_interop import _check_agent_unary_rpcs, _go_agent_call, go_peer
from tests.ttrpc.test_interop import pytestmark as interop_marks
from vmfactory.agent import AgentClient
from vmfactory.config import Config
from vmfactory.factory.direct import DirectFactory
from vmfactory.guest.image import GuestImage
from vmfactory.hypervisor.qemu import QemuHypervisor
from vmfactory.proto import agent_pb2
from vmfactory.ttrpc import frames as f

pytestmark = [*interop_marks, pytest.mark.qemu]
__all__ = ["go_peer"]  # the fixture, used here by name


async def test_the_go_client_calls_the_agent_in_a_real_vm(go_peer: Path, config: Config,
                                                          guest_image: GuestImage) -> None:
    factory = DirectFactory(config, QemuHypervisor(config.paths.run_dir, config.timeouts))
    machine = await factory.get_vm()
    try:
        await machine.disconnect_agent()
        await asyncio.to_thread(_check_agent_unary_rpcs, go_peer, machine.agent_socket,
                                "guest")
        kind, out = await asyncio.to_thread(
            _go_agent_call, go_peer, machine.agent_socket, "Containers", "ListContainers",
            agent_pb2.ListContainersRequest().SerializeToString())
        assert kind == "reply"
        assert list(agent_pb2.ListContainersReply.FromString(bytes.fromhex(out)).containers) \
            == []
        kind, out = await asyncio.to_thread(
            _go_agent_call, go_peer, machine.agent_socket, "Containers", "RemoveContainer",
            agent_pb2.RemoveContainerRequest(container_id="nobody").SerializeToString())
        assert kind == "error" and out.startswith(str(f.NOT_FOUND))
        # After the Go client, a Python one: a session each, one after the other.
        client = AgentClient(f"unix:{machine.agent_socket}", call_timeout=10)
        try:
            await client.wait_ready(30)
            assert (await client.info(0)).platform == "guest"
        finally:
            await client.close()
    finally:
        await machine.stop()
