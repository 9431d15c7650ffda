"""The asyncio ttrpc server and client over real unix sockets: unary and
streaming calls, many interleaved on one connection, errors as statuses,
deadlines, hostile peers (garbage, oversize, a peer gone mid-frame)."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from vmfactory.proto import ttrpc_pb2 as pb
from vmfactory.ttrpc import aio
from vmfactory.ttrpc import frames as f

pytestmark = pytest.mark.timeout(30)
SVC = "test.v1.Echo"


async def echo(payload: bytes, ctx: aio.CallContext) -> bytes:
    return payload[::-1]


async def slow(payload: bytes, ctx: aio.CallContext) -> bytes:
    await asyncio.sleep(float(payload.decode()))
    return payload


async def fail(payload: bytes, ctx: aio.CallContext) -> bytes:
    if payload == b"rpc":
        raise f.RpcError(f.NOT_FOUND, "no such thing")
    raise ValueError("a bug")


async def meta(payload: bytes, ctx: aio.CallContext) -> bytes:
    return f"{ctx.metadata.get('who')} {ctx.timeout is not None}".encode()


async def upper_stream(stream: aio.ServerStream, ctx: aio.CallContext) -> bytes:
    count = 0
    while (msg := await stream.recv()) is not None:
        await stream.send(msg.upper())
        count += 1
    return str(count).encode()


async def countdown(stream: aio.ServerStream, ctx: aio.CallContext) -> None:
    n = int((await stream.recv() or b"0").decode())
    for i in range(n, 0, -1):
        await stream.send(str(i).encode())
    return None


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[aio.Server, str]]:
    server = aio.Server()
    for name, handler in (("Echo", echo), ("Slow", slow), ("Fail", fail), ("Meta", meta)):
        server.register(SVC, name, handler)
    server.register(SVC, "Upper", upper_stream, streaming=True)
    server.register(SVC, "Countdown", countdown, streaming=True)
    path = str(tmp_path / "t.sock")
    listener = await server.start_unix_server(path)
    try:
        yield server, path
    finally:
        listener.close()
        await server.close()
        await listener.wait_closed()


async def test_unary_calls_and_metadata(served: tuple[aio.Server, str]) -> None:
    async with await aio.Client.connect_unix(served[1]) as c:
        assert await c.call(SVC, "Echo", b"abc") == b"cba"
        assert await c.call(SVC, "Echo", b"") == b""
        assert await c.call(SVC, "Meta", b"", metadata={"who": "me"}, timeout=5) == \
            b"['me'] True"


async def test_interleaved_calls_answer_out_of_order(served: tuple[aio.Server, str]) -> None:
    async with await aio.Client.connect_unix(served[1]) as c:
        order: list[bytes] = []

        async def one(delay: str) -> None:
            order.append(await c.call(SVC, "Slow", delay.encode()))
        await asyncio.gather(one("0.3"), one("0.1"), one("0.2"),
                             *(c.call(SVC, "Echo", str(i).encode()) for i in range(50)))
        assert order == [b"0.1", b"0.2", b"0.3"]


async def test_errors_come_back_as_statuses(served: tuple[aio.Server, str]) -> None:
    async with await aio.Client.connect_unix(served[1]) as c:
        with pytest.raises(f.RpcError) as err:
            await c.call(SVC, "Fail", b"rpc")
        assert (err.value.code, err.value.message) == (f.NOT_FOUND, "no such thing")
        with pytest.raises(f.RpcError) as err:
            await c.call(SVC, "Fail", b"bug")
        assert err.value.code == f.UNKNOWN and "a bug" in err.value.message
        with pytest.raises(f.RpcError) as err:
            await c.call(SVC, "Nope", b"")
        assert err.value.code == f.UNIMPLEMENTED
        assert await c.call(SVC, "Echo", b"still") == b"llits"  # the connection survives


async def test_deadlines_on_both_sides(served: tuple[aio.Server, str]) -> None:
    async with await aio.Client.connect_unix(served[1]) as c:
        with pytest.raises(TimeoutError):
            await c.call(SVC, "Slow", b"5", timeout=0.2)
        assert await c.call(SVC, "Echo", b"ok") == b"ko"  # a late answer is dropped


async def test_streams_both_ways(served: tuple[aio.Server, str]) -> None:
    async with await aio.Client.connect_unix(served[1]) as c:
        s = await c.stream(SVC, "Upper")
        got = []
        for word in (b"a", b"bc", b"def"):
            await s.send(word)
            got.append(await s.recv())
        await s.close_send()
        assert got == [b"A", b"BC", b"DEF"] and await s.recv() is None
        down = await c.stream(SVC, "Countdown", b"3")
        assert [await down.recv() for _ in range(4)] == [b"3", b"2", b"1", None]


async def test_interleaved_streams_keep_their_messages(served: tuple[aio.Server, str]) -> None:
    async with await aio.Client.connect_unix(served[1]) as c:
        streams = [await c.stream(SVC, "Upper") for _ in range(10)]
        for round_ in range(5):
            for i, s in enumerate(streams):
                await s.send(f"s{i}r{round_}".encode())
        for i, s in enumerate(streams):
            assert [await s.recv() for _ in range(5)] == \
                [f"S{i}R{r}".encode() for r in range(5)]
            await s.close_send()
            assert await s.recv() is None


async def _raw(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(path)


async def test_a_peer_gone_mid_frame_breaks_only_its_connection(
        served: tuple[aio.Server, str]) -> None:
    reader, writer = await _raw(served[1])
    frame = f.encode(1, f.REQUEST, 0, pb.Request(service=SVC, method="Echo",
                                                  payload=b"x").SerializeToString())
    writer.write(frame[:7])
    await writer.drain()
    writer.close()
    async with await aio.Client.connect_unix(served[1]) as c:
        assert await c.call(SVC, "Echo", b"ab") == b"ba"


@pytest.mark.parametrize("garbage", [
    struct.pack(">IIBB", f.MAX_DATA + 1, 1, f.REQUEST, 0),   # oversize
    f.encode(2, f.REQUEST, 0, b""),                          # an even (server) stream id
    f.encode(1, f.RESPONSE, 0, b""),                         # a response from a client
])
async def test_protocol_violations_close_that_connection(served: tuple[aio.Server, str],
                                                         garbage: bytes) -> None:
    reader, writer = await _raw(served[1])
    writer.write(garbage)
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
    writer.close()
    async with await aio.Client.connect_unix(served[1]) as c:
        assert await c.call(SVC, "Echo", b"ok") == b"ko"


async def test_an_undecodable_request_is_invalid_argument(served: tuple[aio.Server, str]) -> None:
    reader, writer = await _raw(served[1])
    writer.write(f.encode(1, f.REQUEST, 0, b"\xff\xff\xff"))
    frame = f.Decoder().feed(await asyncio.wait_for(reader.read(1000), 5))[0]
    resp = pb.Response()
    resp.ParseFromString(frame.data)
    assert resp.status.code == f.INVALID_ARGUMENT
    writer.close()


async def test_a_server_gone_fails_outstanding_calls(tmp_path: Path) -> None:
    server = aio.Server()
    server.register(SVC, "Slow", slow)
    path = str(tmp_path / "g.sock")
    listener = await server.start_unix_server(path)
    c = await aio.Client.connect_unix(path)
    call = asyncio.ensure_future(c.call(SVC, "Slow", b"10"))
    await asyncio.sleep(0.2)
    listener.close()
    await server.close()
    with pytest.raises(f.ConnectionLost):
        await call
    with pytest.raises(f.ConnectionLost):
        await c.call(SVC, "Slow", b"0")
    await c.close()
    await c.close()  # idempotent


async def test_a_frame_left_half_sent_breaks_the_framing_after_the_frame_timeout(
        tmp_path: Path) -> None:
    """serve_channel with frame_timeout gives back what it could not decode."""
    server = aio.Server()
    server.register(SVC, "Echo", echo)
    results: list[bytes | None] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        results.append(await server.serve_channel(aio.StreamChannel(reader, writer),
                                                  frame_timeout=0.3))
    path = str(tmp_path / "t.sock")
    listener = await asyncio.start_unix_server(handle, path=path)
    try:
        reader, writer = await asyncio.open_unix_connection(path)
        req = pb.Request(service=SVC, method="Echo", payload=b"abc").SerializeToString()
        whole = f.encode(1, f.REQUEST, 0, req)
        writer.write(whole)  # answered: a whole frame
        head = struct.pack(">IIBB", 5000, 3, f.REQUEST, 0) + b"xy"
        writer.write(head)
        frame = f.Decoder().feed(await reader.read(1000))[0]
        assert frame.stream_id == 1 and pb.Response.FromString(frame.data).payload == b"cba"
        t0 = asyncio.get_running_loop().time()
        for _ in range(4):  # more bytes keep coming, but the frame's time is up anyway
            await asyncio.sleep(0.1)
            writer.write(b"z")
        while not results:
            await asyncio.sleep(0.02)
        assert 0.25 < asyncio.get_running_loop().time() - t0 < 2
        assert results[0] is not None and results[0].startswith(head)
        writer.close()
    finally:
        listener.close()
        await server.close()
