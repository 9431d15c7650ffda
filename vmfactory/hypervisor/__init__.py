"""The hypervisor plugin: boots and drives VMs (QEMU; a host-process stand-in for tests)."""

from vmfactory.hypervisor.base import BootTimings, Hypervisor, MemoryUsage, Vm, VmSpec, VmState

__all__ = ["BootTimings", "Hypervisor", "MemoryUsage", "Vm", "VmSpec", "VmState"]
