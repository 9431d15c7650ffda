"""The QEMU command line: one device set for every VM, template and clone."""

from __future__ import annotations

from pathlib import Path

from vmfactory.guest.agent import AGENT_PORT_NAME
from vmfactory.guest.agent.ctlproto import CONTROL_PORT_NAME
from vmfactory.hypervisor.base import VmSpec

BASE_KERNEL_ARGS = ("console=ttyS0", "panic=-1", "quiet", "loglevel=3")
# Memory hot-plug slots reserved in every VM so hot-plug works on clones too.
MEMORY_SLOTS = 8
# PCIe root ports for hot-plugged disks (one container root each); q35 cannot
# hot-plug onto its root bus.  Part of every VM's device set, templates included.
DISK_PORTS = 8


def qemu_argv(spec: VmSpec, run_dir: Path, name: str) -> list[str]:
    """The QEMU command line for ``spec``; the device set is the same for every VM."""
    vm = spec.vm
    append = " ".join((*BASE_KERNEL_ARGS, *spec.extra_kernel_args, vm.kernel_args)).strip()
    machine = f"q35,accel={spec.accel}"
    memory: list[str] = []
    if spec.memory_path is not None:
        share = "on" if spec.memory_shared else "off"
        memory = ["-object", f"memory-backend-file,id=mem,size={vm.memory_mib}M,"
                             f"mem-path={spec.memory_path},share={share}"]
        machine += ",memory-backend=mem"
    argv = [
        vm.qemu, "-name", f"vmfactory-{name}", "-nodefaults", "-no-user-config",
        "-display", "none", "-no-reboot", *memory,
        "-machine", machine,
        "-cpu", "host" if spec.accel == "kvm" else "max",
        "-smp", f"{vm.cpus},maxcpus={vm.max_cpus}",
        "-m", f"{vm.memory_mib}M,slots={MEMORY_SLOTS},maxmem={vm.max_memory_mib}M",
        "-kernel", str(spec.kernel), "-initrd", str(spec.initrd), "-append", append,
        "-chardev", f"file,id=console,path={run_dir / 'console.log'}",
        "-serial", "chardev:console",
        "-qmp", f"unix:{run_dir / 'qmp.sock'},server=on,wait=off",
        "-drive", f"file={spec.rootfs},if=none,id=root,format=raw,readonly=on",
        "-device", "virtio-blk-pci,drive=root,id=rootdisk",
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=agent,path={run_dir / 'agent.sock'},server=on,wait=off",
        "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
        "-chardev", f"socket,id=ctl,path={run_dir / 'ctl.sock'},server=on,wait=off",
        "-device", f"virtserialport,chardev=ctl,name={CONTROL_PORT_NAME}",
        "-device", "vmgenid,id=vmgen0",
        *(arg for i in range(DISK_PORTS)
          for arg in ("-device", f"pcie-root-port,id=hp{i},chassis={i + 1},bus=pcie.0")),
        "-pidfile", str(run_dir / "qemu.pid"),
    ]
    if spec.is_clone:
        argv += ["-incoming", "defer", "-S"]  # stay paused after the restore: we cont
    return argv


def last_line(path: Path, marker: str = "") -> str:
    """The last non-empty line of a log (the last one containing ``marker``, if given)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and marker in ln]
    return lines[-1][-300:] if lines else ""
