"""vmfactory's ttrpc against the reference implementation: containerd's Go ttrpc
(Debian's golang-github-containerd-ttrpc-dev, 1.1), built by the test with
Debian's Go, as a client of our asyncio server, as a server for our clients, and
as a client of the guest agent's unary RPCs (the stand-in, and a real VM's)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import wrappers_pb2

from tests import standin
from vmfactory.hypervisor.process import ProcessVm
from vmfactory.proto import agent_pb2
from vmfactory.ttrpc import aio, sync
from vmfactory.ttrpc import frames as f

GOPATH = Path("/usr/share/gocode")
SOURCE = Path(__file__).parent / "interop" / "main.go"
# The stand-in VM's fixtures, used here by name.
run_root, hypervisor, vm = standin.run_root, standin.hypervisor, standin.vm

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("go") is None
                       or not (GOPATH / "src/github.com/containerd/ttrpc").is_dir(),
                       reason="golang-go and golang-github-containerd-ttrpc-dev are not "
                              "installed (./dev setup installs them)")]


@pytest.fixture(scope="module")
def go_peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("go") / "ttrpc-interop"
    env = {**os.environ, "GOPATH": str(GOPATH), "GO111MODULE": "off", "GOFLAGS": "",
           "GOCACHE": str(out.parent / "cache")}
    built = subprocess.run(["go", "build", "-o", str(out), str(SOURCE)], env=env,
                           capture_output=True, text=True, timeout=110)
    assert built.returncode == 0, built.stderr
    yield out


async def _echo(payload: bytes, ctx: aio.CallContext) -> bytes:
    req = wrappers_pb2.BytesValue.FromString(payload)
    return wrappers_pb2.BytesValue(value=req.value[::-1]).SerializeToString()


async def _fail(payload: bytes, ctx: aio.CallContext) -> bytes:
    raise f.RpcError(f.NOT_FOUND, "nothing here")


async def test_the_go_client_calls_our_server(go_peer: Path, tmp_path: Path) -> None:
    server = aio.Server()
    server.register("test.v1.Echo", "Echo", _echo)
    server.register("test.v1.Echo", "Fail", _fail)
    path = str(tmp_path / "py.sock")
    listener = await server.start_unix_server(path)
    try:
        proc = await asyncio.create_subprocess_exec(str(go_peer), "client", path,
                                                    stdout=subprocess.PIPE,
                                                    stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        listener.close()
        await server.close()
    assert proc.returncode == 0, err
    assert out.decode().splitlines() == ["echo olleh", f"fail {f.NOT_FOUND} nothing here",
                                         f"missing {f.UNIMPLEMENTED}"]


@pytest.fixture
def go_server(go_peer: Path, tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "go.sock")
    proc = subprocess.Popen([str(go_peer), "server", path], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        yield path
    finally:
        proc.kill()
        proc.wait()


async def test_our_asyncio_client_calls_the_go_server(go_server: str) -> None:
    async with await aio.Client.connect_unix(go_server) as c:
        reply = await c.call("test.v1.Go", "Upper",
                             wrappers_pb2.BytesValue(value=b"abc").SerializeToString(), timeout=5)
        assert wrappers_pb2.BytesValue.FromString(reply).value == b"ABC"
        calls = [c.call("test.v1.Go", "Upper",
                        wrappers_pb2.BytesValue(value=f"x{i}".encode()).SerializeToString())
                 for i in range(20)]
        assert [wrappers_pb2.BytesValue.FromString(r).value for r in await asyncio.gather(*calls)]\
            == [f"X{i}".encode() for i in range(20)]
        with pytest.raises(f.RpcError) as err:
            await c.call("test.v1.Go", "Nope", b"")
        assert err.value.code == f.UNIMPLEMENTED


def test_our_sync_client_calls_the_go_server(go_server: str) -> None:
    with sync.Client.connect_unix(go_server) as c:
        reply = c.call("test.v1.Go", "Upper",
                       wrappers_pb2.BytesValue(value=b"sync").SerializeToString(), timeout=5)
        assert wrappers_pb2.BytesValue.FromString(reply).value == b"SYNC"


# --- the Go client against the guest agent itself -------------------------------------

def _go_agent_call(go_peer: Path, socket_path: Path, service: str, method: str,
                   request: bytes) -> tuple[str, str]:
    """("reply", hex of the reply) or ("error", "CODE MESSAGE") from the Go client."""
    done = subprocess.run([str(go_peer), "agent", str(socket_path),
                           f"vmfactory.agent.v1.{service}", method, request.hex()],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    kind, _, rest = done.stdout.strip().partition(" ")
    return kind, rest


def _check_agent_unary_rpcs(go_peer: Path, socket_path: Path, platform: str) -> None:
    kind, out = _go_agent_call(go_peer, socket_path, "Agent", "Ping",
                               agent_pb2.PingRequest(token=0x1234567890).SerializeToString())
    assert kind == "reply"
    ping = agent_pb2.PingReply.FromString(bytes.fromhex(out))
    assert ping.token == 0x1234567890 and ping.agent_version
    kind, out = _go_agent_call(go_peer, socket_path, "Agent", "GetInfo",
                               agent_pb2.GetInfoRequest(random_bytes=16).SerializeToString())
    info = agent_pb2.GuestInfo.FromString(bytes.fromhex(out))
    assert kind == "reply" and info.platform == platform and len(info.random) == 16
    assert _go_agent_call(go_peer, socket_path, "Agent", "GetInfo",
                          agent_pb2.GetInfoRequest(random_bytes=1000).SerializeToString()) \
        == ("error", f"{f.INVALID_ARGUMENT} random_bytes must be at most 256")
    assert _go_agent_call(go_peer, socket_path, "Agent", "Nope", b"")[1].startswith(
        str(f.UNIMPLEMENTED))


async def test_the_go_client_calls_the_stand_in_agent(go_peer: Path, vm: ProcessVm) -> None:
    await vm.disconnect_agent()  # the agent socket is the Go client's now
    await asyncio.to_thread(_check_agent_unary_rpcs, go_peer, vm.agent_socket, "host-standin")
