"""ttrpc: containerd's lightweight RPC over one stream connection (a unix socket,
a virtio-serial port), framed as its PROTOCOL.md says, in Python.

``frames``  the 10-byte header, the incremental decoder, the envelopes;
``aio``     asyncio server and client (unary and streaming calls, many at once);
``sync``    a blocking client and a thread-per-connection server.

Errors (one tree)::

    TtrpcError                    anything this package raises
    ├── ProtocolError             the peer broke the framing (the connection is closed)
    ├── ConnectionLost            the connection ended with calls outstanding
    └── RpcError(code, message)   the server answered with a non-OK status
"""

from vmfactory.ttrpc.frames import ConnectionLost, ProtocolError, RpcError, TtrpcError

__all__ = ["ConnectionLost", "ProtocolError", "RpcError", "TtrpcError"]
