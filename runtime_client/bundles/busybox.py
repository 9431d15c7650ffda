"""Build OCI bundles from the host's static busybox (Debian's busybox-static).

The demo's container and the tests' bundles: a static binary runs in any root
without shared libraries, so a bundle needs nothing but busybox and its applet
links.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from collections.abc import Sequence
from pathlib import Path

from runtime_client.errors import BundleError

PT_INTERP = 3
NOT_INSTALLED = "busybox-static is not installed (apt-get install busybox-static)"


def is_static_elf(path: Path) -> bool:
    """True if ``path`` is an ELF executable without a PT_INTERP (dynamic loader) header."""
    with open(path, "rb") as f:
        ident = f.read(16)
        if len(ident) < 16 or ident[:4] != b"\x7fELF" or ident[4] not in (1, 2):
            return False
        wide = ident[4] == 2  # ELFCLASS64
        order = "<" if ident[5] == 1 else ">"
        header = f.read(48 if wide else 36)
        # e_phoff, then e_phentsize / e_phnum after the flags and e_ehsize.
        phoff = struct.unpack_from(order + ("Q" if wide else "I"), header, 16 if wide else 12)[0]
        phentsize, phnum = struct.unpack_from(order + "HH", header, 38 if wide else 26)
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            raw = f.read(4)
            if len(raw) < 4:
                return False
            if struct.unpack(order + "I", raw)[0] == PT_INTERP:
                return False
    return True


def static_busybox() -> Path:
    """The host's busybox binary, if it is static; BundleError otherwise."""
    found = shutil.which("busybox")
    if found is None:
        raise BundleError(NOT_INSTALLED)
    binary = Path(os.path.realpath(found))
    if not is_static_elf(binary):
        raise BundleError(NOT_INSTALLED)
    return binary


def busybox_applets(binary: Path) -> list[str]:
    out = subprocess.run([str(binary), "--list"], capture_output=True, text=True, check=True)
    return [name for name in out.stdout.split() if name and "/" not in name and name != "busybox"]


def make_busybox_bundle(dest: Path, args: Sequence[str] = ("sh",), *, terminal: bool = False,
                        env: Sequence[str] = (), cwd: str = "/", hostname: str = "") -> Path:
    """Write an OCI bundle running ``args`` under a busybox root at ``dest``; return ``dest``."""
    binary = static_busybox()
    rootfs = dest / "rootfs"
    bin_dir = rootfs / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(binary, bin_dir / "busybox")
    for applet in busybox_applets(binary):
        link = bin_dir / applet
        if not link.is_symlink():
            link.symlink_to("busybox")  # relative, so it resolves inside any root
    etc = rootfs / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (etc / "group").write_text("root:x:0:\n")
    for name, mode in (("proc", 0o555), ("dev", 0o755), ("sys", 0o555), ("tmp", 0o1777),
                       ("root", 0o700)):
        (rootfs / name).mkdir(exist_ok=True)
        os.chmod(rootfs / name, mode)  # explicit: mkdir's mode is filtered by the umask
    config: dict[str, object] = {
        "ociVersion": "1.0.2",
        "process": {"args": list(args), "env": ["PATH=/bin:/sbin", *env], "cwd": cwd,
                    "user": {"uid": 0, "gid": 0}, "terminal": terminal},
        "root": {"path": "rootfs", "readonly": False},
    }
    if hostname:
        config["hostname"] = hostname
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dest
