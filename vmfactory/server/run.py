"""``vmfactory init``: run the daemon in the foreground until SIGTERM, SIGINT or Quit."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc

from vmfactory.config import Config, to_toml
from vmfactory.daemon import Daemon
from vmfactory.server.grpc_service import claim_socket, start_server

logger = logging.getLogger(__name__)


async def serve(config: Config) -> None:
    """Start, serve until asked to stop, then stop taking requests, let in-flight
    ones finish within ``daemon.grace_s``, and tear everything down."""
    claim_socket(config.daemon.socket)
    daemon = Daemon(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.request_stop)
    server: grpc.aio.Server | None = None
    try:
        await daemon.start()
        server = await start_server(daemon, to_toml(config))
        await daemon.wait_stopped()
        logger.info("stopping: no new requests, %g s grace for in-flight ones",
                    config.daemon.grace_s)
    finally:
        daemon.events.close()  # ends Watch streams, so they do not hold up the grace
        if server is not None:
            await server.stop(config.daemon.grace_s)
        await daemon.shutdown()
        config.daemon.socket.unlink(missing_ok=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
