"""What the guest agent answers with when it refuses a request, and the one
table that carries it across the agent API::

    AgentError (vmfactory.errors)
    └── GuestError            the agent could not do it         INTERNAL
        ├── BadRequest        malformed or out-of-range values  INVALID_ARGUMENT
        ├── NoSuchContainer   no such container or process      NOT_FOUND
        ├── AlreadyExists     that id is taken                  ALREADY_EXISTS
        ├── AgentStateError   wrong state for the request       FAILED_PRECONDITION
        ├── ExecFailed        the process could not be set up   FAILED_PRECONDITION
        │   └── CannotExecute   execve failed (.errno says why)  FAILED_PRECONDITION
        └── Timeout           something did not appear in time  DEADLINE_EXCEEDED

The agent's server answers with the status in :data:`WIRE` and puts the class
name (and errno) beside it in the trailing metadata; the host's agent client
raises the same class again with :func:`from_status`, so a type check or an
errno means on the host what it meant in the guest.
"""

from __future__ import annotations

import errno as errnos

from vmfactory.errors import AgentError

REASON_KEY = "vmfactory-error"
ERRNO_KEY = "vmfactory-errno"


class GuestError(AgentError):
    """Base: a request the agent refused.  ``errno`` is the OS error behind it (0: none)."""

    def __init__(self, message: str, *, errno: int = 0, call: str = "") -> None:
        Exception.__init__(self, f"agent {call}: {message}" if call else message)
        self.call = call
        self.errno = errno
        self.message = message

    @property
    def code(self) -> str:  # type: ignore[override]
        return status_of(self)


class BadRequest(GuestError):
    """A request's values are malformed or out of range."""


class NoSuchContainer(GuestError):
    """No container (or no process in it) with that id."""


class AlreadyExists(GuestError):
    """A container or process with that id exists."""


class AgentStateError(GuestError):
    """The request does not fit the container's or process's state."""


class ExecFailed(GuestError):
    """The process could not be set up (root mount, cwd, credentials ...)."""


class CannotExecute(ExecFailed):
    """The program itself could not be executed; ``errno`` says why (ENOENT: no
    such file, EACCES: not executable ...)."""

    @property
    def exit_code(self) -> int:
        """As a shell reports it: 127 for a program not found, 126 for one not runnable."""
        return 127 if self.errno == errnos.ENOENT else 126


class Timeout(GuestError):
    """A disk or a process did not appear in time."""


# Most specific first: the first class an error is an instance of decides.
WIRE: tuple[tuple[type[GuestError], str], ...] = (
    (BadRequest, "INVALID_ARGUMENT"),
    (NoSuchContainer, "NOT_FOUND"),
    (AlreadyExists, "ALREADY_EXISTS"),
    (AgentStateError, "FAILED_PRECONDITION"),
    (CannotExecute, "FAILED_PRECONDITION"),
    (ExecFailed, "FAILED_PRECONDITION"),
    (Timeout, "DEADLINE_EXCEEDED"),
    (GuestError, "INTERNAL"),
)
_BY_NAME = {cls.__name__: cls for cls, _ in WIRE}


def status_of(exc: GuestError) -> str:
    """The status code name the agent answers ``exc`` with."""
    return next(code for cls, code in WIRE if isinstance(exc, cls))


def trailers(exc: GuestError) -> tuple[tuple[str, str], ...]:
    """The metadata that lets the host raise ``exc``'s class again."""
    return ((REASON_KEY, type(exc).__name__), (ERRNO_KEY, str(exc.errno)))


def from_status(call: str, code: str, details: str,
                metadata: dict[str, str]) -> AgentError:
    """The error for a failed agent call: the guest's own class when the agent
    named one, else a plain AgentError carrying the status (the agent did not
    answer: unreachable, timed out, channel closed)."""
    cls = _BY_NAME.get(metadata.get(REASON_KEY, ""))
    if cls is not None:
        errno = metadata.get(ERRNO_KEY, "0")
        return cls(details, errno=int(errno) if errno.isdigit() else 0, call=call)
    error = AgentError(call, f"{code}: {details}")
    error.code = code
    return error
