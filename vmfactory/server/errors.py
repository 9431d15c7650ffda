"""The Factory API's one error table: vmfactory errors <-> gRPC statuses.

The server answers an error with the status :data:`STATUS_FOR` gives its class
and names the class in the trailing metadata (``vmfactory-error``); the client
inverts the table with :func:`error_from_rpc`, so the caller gets the class the
daemon raised.  A status that names no class (no daemon on the socket, the
client's own deadline) maps to the first class in the table with that code.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

from vmfactory.errors import (
    AgentError, AlreadyExists, BackgroundFailure, ConfigError, DaemonError, DaemonUnavailable,
    DeadlineExceeded,
    FactoryError, HypervisorError, InvalidRequest, LeaseNotFound, NotFound, PermissionDenied,
    PoolEmpty, ResourceExhausted, StoreError, TemplateError, VmFactoryError,
)

logger = logging.getLogger(__name__)

REASON_KEY = "vmfactory-error"
# Status details travel in a header: bounded well under gRPC's metadata limit.
MAX_DETAILS = 1024

# Most specific first: the first class an error is an instance of decides.
STATUS_FOR: tuple[tuple[type[VmFactoryError], grpc.StatusCode], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (LeaseNotFound, grpc.StatusCode.NOT_FOUND),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (PoolEmpty, grpc.StatusCode.DEADLINE_EXCEEDED),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (DaemonUnavailable, grpc.StatusCode.UNAVAILABLE),
    (BackgroundFailure, grpc.StatusCode.UNAVAILABLE),
    (DaemonError, grpc.StatusCode.UNAVAILABLE),
    (TemplateError, grpc.StatusCode.FAILED_PRECONDITION),
    (FactoryError, grpc.StatusCode.INTERNAL),
    (HypervisorError, grpc.StatusCode.INTERNAL),
    (AgentError, grpc.StatusCode.INTERNAL),
    (StoreError, grpc.StatusCode.INTERNAL),
    (VmFactoryError, grpc.StatusCode.INTERNAL),
)
_BY_NAME = {cls.__name__: cls for cls, _ in STATUS_FOR}


def status_code(exc: VmFactoryError) -> grpc.StatusCode:
    return next(code for cls, code in STATUS_FOR if isinstance(exc, cls))


def _wire_class(exc: VmFactoryError) -> type[VmFactoryError]:
    """The class of ``exc`` the client can raise again: the most specific one in
    the table (a subclass the table does not name travels as its parent)."""
    return next(cls for cls, _ in STATUS_FOR if isinstance(exc, cls))


def error_from_rpc(exc: grpc.aio.AioRpcError) -> VmFactoryError:
    """The client side of the table: the error the daemon raised, same class."""
    metadata = {k: v for k, v in (exc.trailing_metadata() or ()) if isinstance(v, str)}
    cls = _BY_NAME.get(metadata.get(REASON_KEY, ""))
    details = exc.details() or exc.code().name
    if cls is None:
        cls = next((c for c, code in STATUS_FOR if code == exc.code()), VmFactoryError)
        details = f"{exc.code().name}: {details}"
    return cls.remote(details)


class Malformed:
    """Stands in for a request that did not parse, so the handler can say so
    (grpc itself would answer INTERNAL for a deserializer error)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            message = deserialize(data)
        except DecodeError as exc:
            return Malformed(f"malformed request: {exc}")
        unknown = _unknown_field_numbers(message)
        if unknown:
            return Malformed(f"request has unknown fields {unknown}: is the client newer "
                             "than this daemon?")
        return message
    return parse


def _unknown_field_numbers(message: Message) -> list[int]:
    numbers = [f.field_number for f in UnknownFieldSet(message)]
    for field, value in message.ListFields():
        if field.message_type is not None and not field.is_repeated:
            numbers += _unknown_field_numbers(value)
    return sorted(set(numbers))


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns a VmFactoryError raised by a handler (or a request that does not
    parse) into a status with its message."""

    async def intercept_service(self, continuation: Callable[..., Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        deserializer = _tolerant(handler.request_deserializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary), deserializer, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream), deserializer, handler.response_serializer)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                _wrap_bidi(handler.stream_stream), deserializer, handler.response_serializer)
        return handler


def public_message(exc: VmFactoryError, code: grpc.StatusCode) -> str:
    """What the caller is told: the error's message, bounded; for an INTERNAL one
    (a QMP or store failure's raw text is for the operator, not the caller) a
    short line with a reference to the full message in the daemon's log."""
    if code is grpc.StatusCode.INTERNAL:
        ref = secrets.token_hex(4)
        logger.error("request failed [%s]: %s: %s", ref, type(exc).__name__, exc)
        return f"{_wire_class(exc).__name__}: the daemon could not do this [{ref} in its log]"
    message = str(exc)
    return message if len(message) <= MAX_DETAILS else message[:MAX_DETAILS] + "..."


async def _abort(context: grpc.aio.ServicerContext, exc: VmFactoryError) -> None:
    code = status_code(exc)
    await context.abort(code, public_message(exc, code),
                        ((REASON_KEY, _wire_class(exc).__name__),))


def _wrap_unary(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        try:
            return await fn(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug: logged with its traceback, not sent
            await _abort(context, _known(exc))
    return handler


def _wrap_stream(fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        try:
            async for item in fn(request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - as in _wrap_unary
            await _abort(context, _known(exc))
    return handler


def _wrap_bidi(fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def handler(requests: AsyncIterator[Any],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async def parsed() -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, Malformed):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
                yield request
        try:
            async for item in fn(parsed(), context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - as in _wrap_unary
            await _abort(context, _known(exc))
    return handler


def _known(exc: Exception) -> VmFactoryError:
    """``exc`` if it is one of ours; any other exception is a bug: its traceback
    goes to the log, the caller gets INTERNAL."""
    if isinstance(exc, VmFactoryError):
        return exc
    logger.error("request handler failed", exc_info=exc)
    return VmFactoryError(f"{type(exc).__name__} in the daemon")
