"""vmfactory: a node-level factory of pre-booted VMs for container sandboxes.

This top-level module stays import-free on purpose: the guest image ships
``vmfactory.guest.agent`` and ``vmfactory.proto`` without the host-only parts.
"""

__version__ = "0.1.0"
