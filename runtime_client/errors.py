"""The runtime client's own errors, on top of vmfactory's tree.

Errors from the daemon and from the guest agent arrive with the classes they
were raised with (``vmfactory.errors``, ``vmfactory.guest.agent.errors``);
the client adds its own under :class:`ClientError`::

    VmFactoryError (vmfactory.errors)
    └── ClientError              the runtime client cannot do this
        ├── BundleError          the OCI bundle is unusable
        ├── SandboxError         wrong state, its VM is gone, a mode mismatch
        ├── ContainerError       the container's state does not allow it
        │   └── ExecutableNotFound  the program is not in the bundle's root
        └── ProxyError           a proxy cannot bind, start or be spawned

The CLIs turn them into exit codes, each with one table.
"""

from __future__ import annotations

from vmfactory.errors import VmFactoryError


class ClientError(VmFactoryError):
    """Base of every error the runtime client raises itself."""


class BundleError(ClientError):
    """The OCI bundle is unusable: bad config.json, missing rootfs, ..."""


class SandboxError(ClientError):
    """A sandbox cannot do this: wrong state, its VM is gone, a mode mismatch."""


class ContainerError(ClientError):
    """The request does not fit the container's state."""


class ExecutableNotFound(ContainerError):
    """The program is not in the bundle's root (exit code 127 in the CLI)."""


class ProxyError(ClientError):
    """The proxy cannot bind, start, or be spawned."""
