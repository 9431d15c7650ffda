"""The vmfactory error tree.

Every error raised on purpose by the ``vmfactory`` package derives from
:class:`VmFactoryError`.  Transports (CLI, gRPC) translate these at their edge
and nowhere else.
"""

from __future__ import annotations


class VmFactoryError(Exception):
    """Base of every error vmfactory raises on purpose."""


class ConfigError(VmFactoryError):
    """A configuration value is missing, malformed or out of range.

    ``key`` names the offending setting (dotted path), so a person can fix it.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config {key}: {message}")
        self.key = key


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
    """The guest agent did not answer, or answered with an error."""

    def __init__(self, call: str, message: str) -> None:
        super().__init__(f"agent {call}: {message}")
        self.call = call


class FactoryError(VmFactoryError):
    """The factory could not produce a VM for a request."""


class TemplateError(FactoryError):
    """A template is missing, broken, stale or used in the wrong state."""


class InvalidRequest(VmFactoryError):
    """A request's values are malformed or out of range (the caller's fault)."""


class DaemonError(VmFactoryError):
    """The daemon cannot start, or is shutting down."""


class StoreError(VmFactoryError):
    """A metadata store operation failed."""
