"""What a container runtime embeds: sandboxes on VMs from the vmfactory daemon.

The core is ``sandbox`` (Runtime, Sandbox), ``container``, ``vm`` (where a
sandbox's VM comes from: leased, or booted here when no daemon answers) and
``records`` (what another client process needs after a crash).  Around it:
``bundles`` (OCI bundles in), ``shims`` (stdio and signals out), ``proxies``
(who holds a VM's agent channel), and ``cli`` (``vmfactory-runtime``).  The
daemon and the agent are reached through vmfactory's own clients
(``vmfactory.server.client``, ``vmfactory.agent.client``).
"""
