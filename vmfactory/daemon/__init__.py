"""The factory daemon: pools of ready VMs, leases on handed-out ones, their
records in the metadata store, crash recovery and pool events.

``core.Daemon`` is the one object the transports (``vmfactory.server``) call;
it is built by the composition root (``vmfactory.app``) from a config, a
hypervisor and a store.
"""
