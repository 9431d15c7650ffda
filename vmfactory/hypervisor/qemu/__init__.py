"""The QEMU hypervisor plugin, driven over QMP with qemu.qmp.

``argv`` builds the command line (one device set for every VM), ``vm`` runs the
process lifecycle, ``migration`` saves and restores device state (templates and
clones), ``hotplug`` adds vCPUs, memory and disks.  Only the composition root
(``vmfactory.app``) imports this package; everything else sees the
``Hypervisor``/``Vm`` interfaces of ``vmfactory.hypervisor.base``.
"""

from vmfactory.hypervisor.qemu.vm import QemuHypervisor, QemuVm

__all__ = ["QemuHypervisor", "QemuVm"]
