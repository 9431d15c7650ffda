"""The runtime client's errors, mapped back from the daemon's gRPC status codes."""

from __future__ import annotations

import grpc


class ClientError(Exception):
    """Base of every error the runtime client raises on purpose."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class InvalidRequest(ClientError):
    """The daemon rejected the request's values (INVALID_ARGUMENT)."""


class NotFound(ClientError):
    """No such lease or VM (NOT_FOUND)."""


class NoVmInTime(ClientError):
    """No VM became ready before the deadline (DEADLINE_EXCEEDED)."""


class DaemonUnavailable(ClientError):
    """No daemon answers, or it is shutting down (UNAVAILABLE)."""


class ContainerError(ClientError):
    """The request does not fit the container's state, or its program could not
    run (FAILED_PRECONDITION, ALREADY_EXISTS)."""


class SandboxError(ClientError):
    """A sandbox cannot do this: wrong state, its VM is gone, a mode mismatch."""


_BY_CODE: dict[grpc.StatusCode, type[ClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.DEADLINE_EXCEEDED: NoVmInTime,
    grpc.StatusCode.UNAVAILABLE: DaemonUnavailable,
    grpc.StatusCode.FAILED_PRECONDITION: ContainerError,
    grpc.StatusCode.ALREADY_EXISTS: ContainerError,
}


def ended_during_write(exc: grpc.aio.AioRpcError) -> bool:
    """Whether ``exc`` is grpc aio's report of a request write that raced with the
    normal end of a bidirectional call (e.g. stdin sent as the process exited):
    grpc then overwrites the server's OK with INTERNAL (grpc/grpc#36066).  It is
    raised only after the response stream reached its end: no response is lost."""
    return (exc.code() == grpc.StatusCode.INTERNAL
            and "SendMessageOperation" in (exc.debug_error_string() or ""))


def from_rpc_error(exc: grpc.aio.AioRpcError, peer: str = "") -> ClientError:
    """The ClientError for a failed call; ``peer`` names who answered (e.g. "agent")."""
    cls = _BY_CODE.get(exc.code(), ClientError)
    if cls is DaemonUnavailable and peer and peer != "daemon":
        cls = SandboxError
    prefix = f"{peer}: " if peer else ""
    return cls(f"{prefix}{exc.code().name}: {exc.details()}", exc.code())


class BundleError(ClientError):
    """The OCI bundle is unusable: bad config.json, missing rootfs, ..."""
