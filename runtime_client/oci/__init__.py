"""``vmfactory-oci``: the OCI runtime command line (runc's) over factory VMs.

Two halves, so that an engine's many short calls stay cheap:

* ``cli`` and ``state``: the command engines run (podman through conmon,
  containerd's runc shim).  Standard library only: it reads and writes the
  state directory and talks to the container's resident process.
* ``resident``: the process ``create`` forks (its pid is the one written to
  ``--pid-file``).  It holds the sandbox: leases the VM, plugs the root, creates
  the container in the guest, relays its stdio and signals, and exits with its
  exit code once the VM is given back.  ``execproc`` is the same for ``exec``.

Nothing in this package's ``__init__`` may import more than the standard library.
"""
