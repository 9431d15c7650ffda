"""Errors of the guest agent's container service; the gRPC layer maps ``code``."""

from __future__ import annotations


class ContainerError(Exception):
    """Base: a container request that could not be done.  ``code`` names the
    gRPC status code the service answers with."""

    code = "INTERNAL"


class BadRequest(ContainerError):
    code = "INVALID_ARGUMENT"


class NoSuchContainer(ContainerError):
    code = "NOT_FOUND"


class AlreadyExists(ContainerError):
    code = "ALREADY_EXISTS"


class AgentStateError(ContainerError):
    """The request does not fit the container's or process's state."""

    code = "FAILED_PRECONDITION"


class ExecFailed(ContainerError):
    """The program could not be run (missing executable, bad cwd, ...)."""

    code = "FAILED_PRECONDITION"


class Timeout(ContainerError):
    code = "DEADLINE_EXCEEDED"
