"""The guest's read-only root image: Python, its libraries, the agent, busybox.

Kept on a virtio-blk device rather than in the initramfs so it is not copied
into guest RAM at boot (see qemu-notes: a 30 MiB initramfs costs seconds under
TCG and memory in every VM).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

from vmfactory.errors import ImageError

STDLIB_PRUNE = ("test", "idlelib", "tkinter", "ensurepip", "lib2to3", "turtledemo",
                "pydoc_data", "unittest/test", "config-3.11-x86_64-linux-gnu")
GUEST_DISTS = ("protobuf",)  # the agent speaks ttrpc: no grpcio in the guest
DIST_PACKAGES = "usr/lib/python3/dist-packages"
AGENT_ROOT = "opt/vmfactory"
MERGED_USR = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}

_PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # .../vmfactory


def agent_files() -> list[Path]:
    """The host files that make up the agent inside the guest (sorted)."""
    files = [_PACKAGE_ROOT / "__init__.py", _PACKAGE_ROOT / "errors.py",
             _PACKAGE_ROOT / "util" / "__init__.py", _PACKAGE_ROOT / "util" / "states.py",
             _PACKAGE_ROOT / "guest" / "__init__.py"]
    files += sorted((_PACKAGE_ROOT / "guest" / "agent").glob("*.py"))
    files += sorted((_PACKAGE_ROOT / "ttrpc").glob("*.py"))
    proto = _PACKAGE_ROOT / "proto"
    files += [proto / "__init__.py", proto / "agent_pb2.py", proto / "ttrpc_pb2.py"]
    if not all(f.exists() for f in files):
        raise ImageError("agent: generated protobuf modules missing (run python -m vmfactory.proto.gen)")
    return files


def dist_files(name: str) -> list[tuple[Path, str]]:
    """(absolute file, path relative to site-packages) for an installed distribution."""
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ImageError(f"python package {name} is not installed in {sys.prefix}") from exc
    out = []
    for f in dist.files or []:
        rel = str(f)
        if rel.startswith("..") or "__pycache__" in rel or rel.endswith(".pyc"):
            continue
        out.append((Path(str(f.locate())), rel))
    return sorted(out, key=lambda pair: pair[1])


def prepare_tree(root: Path) -> None:
    """Create the merged-/usr skeleton and the mount points init expects."""
    for d in ("usr/bin", "usr/sbin", "usr/lib", "usr/lib64", "proc", "sys", "dev", "run",
              "tmp", "etc", "root", DIST_PACKAGES, AGENT_ROOT):
        (root / d).mkdir(parents=True, exist_ok=True)
    for link, target in MERGED_USR.items():
        if not (root / link).is_symlink():
            (root / link).symlink_to(target)


def prune_stdlib(root: Path) -> None:
    stdlib = root / "usr/lib/python3.11"
    for name in STDLIB_PRUNE:
        shutil.rmtree(stdlib / name, ignore_errors=True)


def install_dists(root: Path) -> None:
    for name in GUEST_DISTS:
        for src, rel in dist_files(name):
            dest = root / DIST_PACKAGES / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest)


def install_agent(root: Path) -> None:
    for src in agent_files():
        dest = root / AGENT_ROOT / src.relative_to(_PACKAGE_ROOT.parent)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)


def _is_elf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"\x7fELF"


def _ldd(path: Path) -> list[str]:
    proc = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=False)
    if "not a dynamic executable" in proc.stdout + proc.stderr or "statically linked" in proc.stdout:
        return []
    libs = []
    for line in proc.stdout.splitlines():
        line = line.strip()
        if "not found" in line:
            raise ImageError(f"shared library {line.split()[0]} needed by {path.name} "
                             "is not on this host")
        if "=>" in line:
            target = line.split("=>", 1)[1].split("(")[0].strip()
            if target:
                libs.append(target)
        elif line.startswith("/"):
            libs.append(line.split()[0])
    return libs


def install_shared_libs(root: Path) -> int:
    """Copy the shared-library closure of every ELF file in the tree; return the count."""
    needed: set[str] = set()
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath, name)
            if path.is_file() and not path.is_symlink() and _is_elf(path):
                needed.update(_ldd(path))
    for lib in sorted(needed):
        rel = lib.lstrip("/")
        top, _, rest = rel.partition("/")
        dest = root / (MERGED_USR[top] + "/" + rest if top in MERGED_USR else rel)
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(os.path.realpath(lib), dest)
            dest.chmod(0o755)
    return len(needed)


def compile_bytecode(root: Path) -> None:
    """Precompile .pyc files: the guest's root is read-only, and compiling there is slow."""
    targets = [str(root / p) for p in ("usr/lib/python3.11", DIST_PACKAGES, AGENT_ROOT)]
    proc = subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0",
                           "--invalidation-mode", "unchecked-hash", "-s", str(root), "-p", "/",
                           *targets], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ImageError(f"compile bytecode: {(proc.stdout + proc.stderr).strip()[-300:]}")


def tree_size(root: Path) -> int:
    total = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            p = Path(dirpath, name)
            if not p.is_symlink():
                total += (p.stat().st_size + 4095) // 4096 * 4096 + 256
    return total


def make_ext4(root: Path, image: Path) -> None:
    """Pack ``root`` into an ext4 file system image without mounting anything."""
    # Room for ext4's own metadata (inode tables, directories): the root is read-only.
    size_mib = tree_size(root) * 9 // 8 // (1 << 20) + 12
    argv = ["mkfs.ext4", "-q", "-F", "-L", "vmfroot", "-O", "^has_journal",
            "-E", "root_owner=0:0", "-d", str(root), str(image), f"{size_mib}M"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise ImageError("mkfs.ext4 is not installed (apt-get install e2fsprogs)") from exc
    if proc.returncode != 0:
        raise ImageError(f"mkfs.ext4: {proc.stderr.strip()}")
