"""Guest image builder: kernel + small initramfs + read-only ext4 root image.

Inputs are Debian packages (``apt-get download`` + ``dpkg-deb -x``; no kernel is
installed on the host), the Python distributions installed beside vmfactory
(protobuf), the agent's own files and this recipe.  Their digests
form the image key: unchanged inputs reuse ``<images>/<key>``, any change (an
agent file, a package update) builds a new image.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import importlib.metadata
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from vmfactory.errors import ImageError
from vmfactory.guest import debs, kmod, rootfs
from vmfactory.guest.cpio import CpioWriter
from vmfactory.util.progress import Progress

logger = logging.getLogger(__name__)

RECIPE_VERSION = "3"  # 3: the kernel without its stored .bss, a tighter root image
INIT_SCRIPT = Path(__file__).with_name("init.sh")
PYTHON_PACKAGES = ["python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib"]
# virtio transport + agent channel + root disk; overlay for container layers later.
KERNEL_MODULES = ["virtio_pci", "virtio_console", "virtio_blk", "crc32c_generic", "ext4", "overlay"]
MODULE_DIRS = ("kernel/drivers/virtio/", "kernel/drivers/char/", "kernel/drivers/block/",
               "kernel/fs/", "kernel/lib/", "kernel/crypto/")


@dataclass(frozen=True)
class GuestImage:
    """A built image: the three files QEMU needs and what they were built from."""

    key: str
    directory: Path
    kernel: Path
    initrd: Path
    rootfs: Path
    kernel_release: str
    manifest: dict

    @classmethod
    def load(cls, directory: Path) -> GuestImage:
        manifest = json.loads((directory / "manifest.json").read_text())
        return cls(manifest["key"], directory, directory / "kernel", directory / "initrd.img",
                   directory / "rootfs.ext4", manifest["kernel_release"], manifest)


@dataclass(frozen=True)
class BuildPlan:
    """The resolved inputs of one image and their key."""

    kernel: debs.DebRef
    busybox: debs.DebRef
    python: list[debs.DebRef]
    inputs: dict[str, str]

    @property
    def key(self) -> str:
        blob = json.dumps(self.inputs, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:20]


def _file_digest(paths: list[Path], root: Path = Path(__file__).resolve().parents[2]) -> str:
    """Digest of files' contents and their place (relative to ``root`` when inside it)."""
    h = hashlib.sha256()
    for p in paths:
        name = str(p.relative_to(root)) if p.is_relative_to(root) else p.name
        h.update(name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _dist_digest(name: str) -> str:
    dist = importlib.metadata.distribution(name)
    record = dist.read_text("RECORD") or ""
    return f"{dist.version}:{hashlib.sha256(record.encode()).hexdigest()}"


def plan(downloads: Path) -> BuildPlan:
    """Resolve every input (cheap: no downloads) and compute the image key."""
    refs = debs.resolve_cached([debs.KERNEL_METAPACKAGE, "busybox-static", *PYTHON_PACKAGES],
                               downloads / "resolved.json")
    inputs = {f"deb:{r.package}": r.sha256 for r in refs}
    for name in rootfs.GUEST_DISTS:
        try:
            inputs[f"dist:{name}"] = _dist_digest(name)
        except importlib.metadata.PackageNotFoundError as exc:
            raise ImageError(f"python package {name} is not installed") from exc
    inputs["agent"] = _file_digest(rootfs.agent_files())
    inputs["init"] = _file_digest([INIT_SCRIPT])
    inputs["recipe"] = RECIPE_VERSION + ":" + ",".join(KERNEL_MODULES)
    return BuildPlan(refs[0], refs[1], refs[2:], inputs)


class ImageBuilder:
    """Builds guest images into ``<state_dir>/images`` with downloads cached."""

    STEPS = 7

    def __init__(self, state_dir: Path, *, quiet: bool = False) -> None:
        self.images = state_dir / "images"
        self.downloads = state_dir / "downloads"
        self.quiet = quiet

    def ensure(self, force: bool = False) -> GuestImage:
        """Return the image for the current inputs, building it if needed."""
        self.images.mkdir(parents=True, exist_ok=True)
        with open(self.images / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per state dir
            build_plan = plan(self.downloads)
            target = self.images / build_plan.key
            if (target / "manifest.json").exists() and not force:
                return GuestImage.load(target)
            return self._build(build_plan, target)

    def _build(self, build_plan: BuildPlan, target: Path) -> GuestImage:
        progress = Progress(self.STEPS, quiet=self.quiet, prefix="image: ")
        progress.note(f"building guest image {build_plan.key}")
        start = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=self.images))
        try:
            with progress.step("download Debian packages"):
                files = {r.package: debs.fetch(r, self.downloads)
                         for r in [build_plan.kernel, build_plan.busybox, *build_plan.python]}
            out = work / "out"
            out.mkdir()
            with progress.step("unpack kernel and modules"):
                release, modules = self._unpack_kernel(files[build_plan.kernel.package], work, out)
            with progress.step("write initramfs"):
                busybox = self._unpack_busybox(files[build_plan.busybox.package], work)
                order = kmod.load_order(KERNEL_MODULES, modules)
                self._write_initramfs(out / "initrd.img", busybox, order, modules)
            tree = work / "rootfs"
            with progress.step("stage Python and the agent"):
                self._stage_rootfs(tree, [files[r.package] for r in build_plan.python], busybox)
            with progress.step("copy shared libraries"):
                rootfs.install_shared_libs(tree)
            with progress.step("precompile bytecode"):
                rootfs.compile_bytecode(tree)
            with progress.step("pack root image (ext4)"):
                rootfs.make_ext4(tree, out / "rootfs.ext4")
            self._finish(build_plan, out, release, order, time.monotonic() - start)
            if target.exists():
                shutil.rmtree(target)
            out.rename(target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        image = GuestImage.load(target)
        progress.note(f"image {image.key} ready in {image.manifest['build_seconds']:.1f} s "
                      f"({image.manifest['size_mib']['total']:.1f} MiB)")
        return image

    @staticmethod
    def _unpack_kernel(deb: Path, work: Path, out: Path) -> tuple[str, dict[str, Path]]:
        def keep(name: str) -> bool:
            if name.startswith("./boot/vmlinuz-"):
                return True
            _, _, rest = name.partition("/lib/modules/")
            rel = rest.partition("/")[2]
            return rel.endswith(".ko") and rel.startswith(MODULE_DIRS)

        written = debs.extract(deb, work / "kernel", keep)
        vmlinuz = [n for n in written if n.startswith("./boot/vmlinuz-")]
        if not vmlinuz:
            raise ImageError(f"kernel package {deb.name} has no /boot/vmlinuz")
        release = vmlinuz[0].removeprefix("./boot/vmlinuz-")
        bzimage = (work / "kernel" / vmlinuz[0]).read_bytes()
        elf = kmod.extract_vmlinux(bzimage)
        (out / "kernel").write_bytes(kmod.trim_elf_zeros(elf) if elf else bzimage)
        return release, kmod.index_modules(work / "kernel")

    @staticmethod
    def _unpack_busybox(deb: Path, work: Path) -> Path:
        debs.extract(deb, work / "busybox")
        for candidate in ("bin/busybox", "usr/bin/busybox"):
            if (work / "busybox" / candidate).is_file():
                return work / "busybox" / candidate
        raise ImageError(f"busybox package {deb.name} has no busybox binary")

    @staticmethod
    def _write_initramfs(path: Path, busybox: Path, order: list[str],
                         modules: dict[str, Path]) -> None:
        with gzip.open(path, "wb", compresslevel=6) as gz:
            cpio = CpioWriter(gz)  # type: ignore[arg-type]
            for d in ("bin", "dev", "etc", "lib", "lib/modules", "newroot", "proc", "sys", "run"):
                cpio.add_dir(d)
            cpio.add_chardev("dev/console", 5, 1)
            cpio.add_file("bin/busybox", busybox.read_bytes(), 0o755)
            cpio.add_file("init", INIT_SCRIPT.read_bytes(), 0o755)
            cpio.add_file("etc/modules.order", ("\n".join(order) + "\n").encode())
            for name in order:
                cpio.add_file(f"lib/modules/{name}.ko", modules[name].read_bytes())
            cpio.close()

    @staticmethod
    def _stage_rootfs(tree: Path, python_debs: list[Path], busybox: Path) -> None:
        rootfs.prepare_tree(tree)
        staging = tree.parent / "python-debs"
        for deb in python_debs:
            debs.extract(deb, staging)
        for top in ("usr", "etc"):
            if (staging / top).exists():
                shutil.copytree(staging / top, tree / top, symlinks=True, dirs_exist_ok=True)
        if not (tree / "usr/bin/python3.11").exists():
            raise ImageError("python3.11-minimal did not provide /usr/bin/python3.11")
        rootfs.prune_stdlib(tree)
        shutil.copy2(busybox, tree / "usr/bin/busybox")
        rootfs.install_dists(tree)
        rootfs.install_agent(tree)

    @staticmethod
    def _finish(build_plan: BuildPlan, out: Path, release: str, order: list[str],
                seconds: float) -> None:
        sizes = {f: (out / f).stat().st_size / (1 << 20)
                 for f in ("kernel", "initrd.img", "rootfs.ext4")}
        sizes["total"] = sum(sizes.values())
        manifest = {"key": build_plan.key, "kernel_release": release, "modules": order,
                    "inputs": build_plan.inputs, "built_at": time.time(),
                    "build_seconds": round(seconds, 2), "size_mib": sizes}
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
