"""Explicit lifecycle states: one guard decorator, one logged place that changes them.

A class that has a lifecycle keeps an enum in ``state``, changes it only with
:meth:`Lifecycle._set_state` (which logs every transition under the class's own
module logger) and guards its operations with :func:`require`::

    class Vm(Lifecycle[VmState]):
        @require(VmState.RUNNING)
        async def pause(self) -> None: ...

A guarded call in another state raises ``self._state_error(operation)``, which
each class defines in terms of its own error tree.
"""

from __future__ import annotations

import enum
import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, Generic, TypeVar

S = TypeVar("S", bound=enum.Enum)
F = TypeVar("F", bound=Callable[..., Any])


class Lifecycle(Generic[S]):
    """Mixin for objects with an explicit ``state``."""

    state: S

    def _lifecycle_name(self) -> str:
        """How log lines name this object (class name and id, if it has one)."""
        ident = getattr(self, "id", None) or getattr(self, "name", None) or ""
        return f"{type(self).__name__} {ident}".strip()

    def _set_state(self, new: S) -> None:
        """The one place ``state`` changes; every transition is logged."""
        old = getattr(self, "state", None)
        self.state = new
        if old is not new:
            logging.getLogger(type(self).__module__).debug(
                "%s: %s -> %s", self._lifecycle_name(), old.value if old is not None else "-",
                new.value)

    def _state_error(self, operation: str) -> Exception:
        """The error for ``operation`` called in the current state (override it)."""
        return RuntimeError(f"{self._lifecycle_name()}: cannot {operation} while "
                            f"{self.state.value}")

    def _check_state(self, operation: str, allowed: tuple[S, ...]) -> None:
        if self.state not in allowed:
            raise self._state_error(operation)


def require(*allowed: enum.Enum, operation: str | None = None) -> Callable[[F], F]:
    """Guard a method (sync or async) of a :class:`Lifecycle`: it runs only in
    one of the ``allowed`` states.  ``operation`` names it in the error
    (default: the method's name, dashed)."""
    def decorate(fn: F) -> F:
        op = operation or fn.__name__.strip("_").replace("_", "-")
        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def guarded_async(self: Lifecycle[Any], *args: Any, **kwargs: Any) -> Any:
                self._check_state(op, allowed)
                return await fn(self, *args, **kwargs)
            wrapper: Any = guarded_async
        else:
            @functools.wraps(fn)
            def guarded(self: Lifecycle[Any], *args: Any, **kwargs: Any) -> Any:
                self._check_state(op, allowed)
                return fn(self, *args, **kwargs)
            wrapper = guarded
        wrapper.allowed_states = allowed
        return wrapper  # type: ignore[no-any-return]
    return decorate
