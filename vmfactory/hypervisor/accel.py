"""Choosing the accelerator: ``auto`` trusts KVM only after a guest boots under it.

On some hosts /dev/kvm opens and KVM_CREATE_VM succeeds, yet a guest never gets
past the firmware.  So ``auto`` boots the guest kernel with the probe flag (init
prints a marker and powers off) under KVM with a deadline; the verdict is cached
per host boot, QEMU binary and kernel.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Literal

from vmfactory.util.tasks import finish

logger = logging.getLogger(__name__)

PROBE_MARKER = "VMFACTORY-PROBE-OK"


def _cache_key(qemu: str, kernel: Path) -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot_id = f.read().strip()
    qemu_path = shutil.which(qemu) or qemu
    st = kernel.stat()
    blob = f"{boot_id}|{qemu_path}|{os.stat(qemu_path).st_mtime}|{kernel}|{st.st_size}|{st.st_mtime}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


async def probe_guest(accel: Literal["kvm", "tcg"], qemu: str, kernel: Path, initrd: Path,
                      timeout: float) -> bool:
    """Boot the probe guest; True if its marker appears within ``timeout``."""
    work = Path(tempfile.mkdtemp(prefix="vmf-probe-"))
    console = work / "console.log"
    argv = [qemu, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-machine", f"q35,accel={accel}", "-cpu", "host" if accel == "kvm" else "max",
            "-m", "256M",
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 quiet vmfactory.probe=1",
            "-chardev", f"file,id=c,path={console}", "-serial", "chardev:c"]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if console.exists() and PROBE_MARKER in console.read_text(errors="replace"):
                return True
            if proc.returncode is not None:
                return False
            await asyncio.sleep(0.1)
        return False
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
        await finish(proc.wait())
        shutil.rmtree(work, ignore_errors=True)


async def resolve_accel(accel: Literal["auto", "kvm", "tcg"], qemu: str, kernel: Path,
                        initrd: Path, timeout: float, cache_dir: Path) -> Literal["kvm", "tcg"]:
    """Turn ``auto`` into ``kvm`` or ``tcg``; explicit choices pass through."""
    if accel != "auto":
        return accel
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    cache = cache_dir / "accel-probe.json"
    key = _cache_key(qemu, kernel)
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return "kvm" if cached["kvm"] else "tcg"
    except (OSError, ValueError, KeyError):
        pass
    logger.info("probing KVM (a guest must boot within %g s) ...", timeout)
    start = time.monotonic()
    works = await probe_guest("kvm", qemu, kernel, initrd, timeout)
    logger.info("KVM %s (probe took %.1f s); using %s", "works" if works else "is unusable",
                time.monotonic() - start, "kvm" if works else "tcg")
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "kvm": works, "probed_at": time.time()}))
    return "kvm" if works else "tcg"
