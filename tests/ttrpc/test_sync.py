"""The blocking ttrpc client and threaded server, and both against the asyncio
ones (one wire format)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from vmfactory.ttrpc import aio, sync
from vmfactory.ttrpc import frames as f

pytestmark = pytest.mark.timeout(30)


def test_sync_client_against_sync_server(tmp_path: Path) -> None:
    server = sync.Server()
    server.register("s", "Echo", lambda b: b[::-1])
    server.register("s", "Fail", lambda b: (_ for _ in ()).throw(
        f.RpcError(f.ABORTED, "no", {"why": "because"})))
    stop, ready = threading.Event(), threading.Event()
    path = str(tmp_path / "s.sock")
    thread = threading.Thread(target=server.serve_unix, args=(path, stop, ready))
    thread.start()
    try:
        assert ready.wait(10)
        with sync.Client.connect_unix(path) as c:
            assert c.call("s", "Echo", b"abc") == b"cba"
            with pytest.raises(f.RpcError) as err:
                c.call("s", "Fail", b"")
            assert err.value.code == f.ABORTED
            assert err.value.details == {"why": "because"}
            with pytest.raises(f.RpcError) as err:
                c.call("s", "Missing", b"")
            assert err.value.code == f.UNIMPLEMENTED
            assert c.call("s", "Echo", b"again") == b"niaga"
    finally:
        stop.set()
        thread.join()


def test_sync_client_against_the_asyncio_server(tmp_path: Path) -> None:
    path = str(tmp_path / "a.sock")
    ready, done = threading.Event(), threading.Event()

    async def serve() -> None:
        server = aio.Server()

        async def echo(b: bytes, ctx: aio.CallContext) -> bytes:
            return b + b"!"
        server.register("s", "Echo", echo)
        listener = await server.start_unix_server(path)
        ready.set()
        while not done.is_set():
            await asyncio.sleep(0.05)
        listener.close()
        await server.close()
    thread = threading.Thread(target=asyncio.run, args=(serve(),))
    thread.start()
    try:
        ready.wait(10)
        with sync.Client.connect_unix(path) as c:
            assert [c.call("s", "Echo", str(i).encode()) for i in range(3)] == \
                [b"0!", b"1!", b"2!"]
    finally:
        done.set()
        thread.join()
