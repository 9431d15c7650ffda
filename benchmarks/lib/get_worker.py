"""A GetVM client in a process of its own, for the pool benchmark's bursts: C
concurrent clients are C processes (each its own interpreter, event loop and gRPC
channel), so the daemon is measured, not one client process's event loop.

Run as ``python -m benchmarks.lib.get_worker SOCKET``.  One JSON line per message:

    parent -> worker   {"op": "get", "timeout": S} | {"op": "release"}; EOF: exit
    worker -> parent   {"ready": true} once its channel is up; per get
                       {"ms", "server_ms", "source"} or {"error", "ms"}; per release
                       {"released": true} or {"error"}
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vmfactory.server.client import FactoryClient  # noqa: E402


def say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def get(client: FactoryClient, timeout: float) -> tuple[dict[str, Any], str | None]:
    t = time.perf_counter()
    try:
        h = await client.get_vm(timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which counts it
        return {"error": f"{type(exc).__name__}: {exc}"[:300],
                "ms": (time.perf_counter() - t) * 1000}, None
    return {"ms": (time.perf_counter() - t) * 1000, "server_ms": h.get_ms,
            "source": h.source}, h.lease_id


async def release(client: FactoryClient, lease: str | None) -> dict[str, Any]:
    if lease is None:
        return {"released": False}
    try:
        await client.release(lease)
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        return {"error": f"release: {exc!r}"[:300]}
    return {"released": True}


async def serve(socket: str) -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    lease: str | None = None
    async with FactoryClient(socket) as client:
        await client.config()  # the channel is up before any measured call
        say({"ready": True})
        while line := await reader.readline():
            op = json.loads(line)
            if op["op"] == "get":
                result, lease = await get(client, float(op["timeout"]))
                say(result)
            else:
                say(await release(client, lease))
                lease = None
        await release(client, lease)  # the parent left: give back what we hold
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(serve(sys.argv[1])))
