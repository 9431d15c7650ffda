"""The vmfactory error tree.

Every error raised on purpose by the ``vmfactory`` package derives from
:class:`VmFactoryError`::

    VmFactoryError
    ├── ConfigError          a setting is missing, malformed or out of range (.key)
    ├── InvalidRequest       a caller's values are malformed or out of range
    ├── PermissionDenied     the caller may not do this (another uid's lease, a file)
    ├── NotFound             no such thing (lease, sandbox, container, disk ...)
    │   └── LeaseNotFound
    ├── AlreadyExists        that name is taken (a disk serial ...)
    ├── ResourceExhausted    no room left (a VM's disk ports ...)
    ├── DeadlineExceeded     the caller's deadline passed before it was served
    │   └── PoolEmpty        no VM became ready before the caller's deadline
    ├── ImageError           the guest image cannot be built
    ├── HypervisorError      a VM could not be started, driven or stopped (.step)
    │   └── VmStateError     an operation in a state that does not allow it
    ├── AgentError           the guest agent did not answer, or refused (.call)
    │   └── GuestError ...   what the agent answers with: vmfactory.guest.agent.errors
    ├── FactoryError         no VM could be made for a request
    │   └── TemplateError    a template is missing, broken, stale or busy
    ├── DaemonError          the daemon cannot start, or is stopping
    │   ├── DaemonUnavailable  no daemon answers (client side)
    │   └── BackgroundFailure  a background loop the daemon needs failed
    └── StoreError           a metadata store operation failed: vmfactory.store.errors

Transports translate these at their edge and nowhere else, each with one table:
``vmfactory.server.errors`` for the Factory API (its client inverts it, so an
error keeps its type across the wire), ``vmfactory.guest.agent.errors`` for the
agent API, the CLIs for exit codes.  A message quotes a caller's value with
:func:`quote`, so it stays short whatever was sent.  This module has no
imports: the guest image ships it with the agent.
"""

from __future__ import annotations


QUOTE_LIMIT = 100


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)``, cut to about ``limit`` characters: how messages show a
    caller's value (a 20 KB lease id must not make a 20 KB error)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


class VmFactoryError(Exception):
    """Base of every error vmfactory raises on purpose."""

    @classmethod
    def remote(cls, message: str) -> VmFactoryError:
        """This error as a client rebuilds it from the wire: the same class and the
        peer's message, without the structured fields its constructor takes."""
        error = cls.__new__(cls)
        Exception.__init__(error, message)
        return error


class ConfigError(VmFactoryError):
    """A configuration value is missing, malformed or out of range.

    ``key`` names the offending setting (dotted path), so a person can fix it.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config {key}: {message}")
        self.key = key


class InvalidRequest(VmFactoryError):
    """A request's values are malformed or out of range (the caller's fault)."""


class PermissionDenied(VmFactoryError):
    """The caller may not do this: another uid's lease, a file it may not use."""


class NotFound(VmFactoryError):
    """No such lease, sandbox, container, process or disk."""


class AlreadyExists(VmFactoryError):
    """That name is taken (a disk serial already attached ...)."""


class LeaseNotFound(NotFound):
    """No lease with that id (never issued, already released or reclaimed)."""


class ResourceExhausted(VmFactoryError):
    """No room left for this (every disk port of the VM is taken ...)."""


class ImageError(VmFactoryError):
    """The guest image cannot be built or one of its inputs is missing or broken."""


class HypervisorError(VmFactoryError):
    """A VM could not be started, driven or stopped.

    ``step`` names the lifecycle step that failed (``qemu-start``,
    ``qmp-connect``, ``agent-ready``, ``shutdown`` ...).
    """

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step


class VmStateError(HypervisorError):
    """An operation was called on a VM in a state that does not allow it."""

    def __init__(self, operation: str, state: str) -> None:
        super().__init__(operation, f"not allowed while the VM is {state}")
        self.state = state


class AgentError(VmFactoryError):
    """The guest agent did not answer, or answered with an error.

    ``call`` names the request; ``code`` is the status the agent answered with
    (``""`` when it did not answer at all).
    """

    code = ""

    def __init__(self, call: str, message: str) -> None:
        super().__init__(f"agent {call}: {message}")
        self.call = call


class FactoryError(VmFactoryError):
    """The factory could not produce a VM for a request."""


class TemplateError(FactoryError):
    """A template is missing, broken, stale or used in the wrong state."""


class DeadlineExceeded(VmFactoryError):
    """The caller's deadline passed before its request was served."""


class PoolEmpty(DeadlineExceeded):
    """No VM became ready before the caller's deadline."""


class DaemonError(VmFactoryError):
    """The daemon cannot start, or is shutting down."""


class DaemonUnavailable(DaemonError):
    """No daemon answers on the socket (raised by clients)."""


class BackgroundFailure(DaemonError):
    """A background loop the daemon cannot run without failed; the daemon
    stopped because of it.  ``task`` names the loop."""

    def __init__(self, task: str, cause: BaseException) -> None:
        super().__init__(f"background task {task} failed: {type(cause).__name__}: {cause}")
        self.task = task


class StoreError(VmFactoryError):
    """A metadata store operation failed."""
