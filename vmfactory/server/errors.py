"""The one place vmfactory errors become gRPC status codes (server side)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

from vmfactory.errors import (
    ConfigError, DaemonError, InvalidRequest, StoreError, TemplateError, VmFactoryError,
)
from vmfactory.leases import LeaseNotFound
from vmfactory.pool import PoolEmpty

logger = logging.getLogger(__name__)

# Most specific first.
STATUS_FOR: tuple[tuple[type[VmFactoryError], grpc.StatusCode], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (LeaseNotFound, grpc.StatusCode.NOT_FOUND),
    (PoolEmpty, grpc.StatusCode.DEADLINE_EXCEEDED),
    (DaemonError, grpc.StatusCode.UNAVAILABLE),
    (TemplateError, grpc.StatusCode.FAILED_PRECONDITION),
    (StoreError, grpc.StatusCode.INTERNAL),
)


def status_code(exc: VmFactoryError) -> grpc.StatusCode:
    for cls, code in STATUS_FOR:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


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
        return handler


async def _abort(context: grpc.aio.ServicerContext, exc: VmFactoryError) -> None:
    code = status_code(exc)
    if code is grpc.StatusCode.INTERNAL:
        logger.error("request failed: %s", exc)
    await context.abort(code, str(exc))


def _wrap_unary(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        try:
            return await fn(request, context)
        except VmFactoryError as exc:
            await _abort(context, exc)
    return handler


def _wrap_stream(fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        try:
            async for item in fn(request, context):
                yield item
        except VmFactoryError as exc:
            await _abort(context, exc)
    return handler
