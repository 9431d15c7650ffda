"""Guest image inputs: apt resolution (faked), the image key, rootfs helpers, the builder's
cache lookup and its pure steps.  No apt, no downloads, no QEMU."""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from vmfactory.errors import ImageError
from vmfactory.guest import debs, image, rootfs
from vmfactory.guest.debs import DebRef
from vmfactory.guest.image import BuildPlan, GuestImage, ImageBuilder

KERNEL_PKG = "linux-image-6.1.0-99-amd64"
PACKAGE_ROOT = Path(image.__file__).resolve().parent.parent  # .../vmfactory


@dataclass
class FakeApt:
    """Stands in for apt: a sha256 per package, and the calls made."""

    lists: Path
    downloads: Path
    shas: dict[str, str] = field(default_factory=dict)
    resolve_calls: list[list[str]] = field(default_factory=list)
    kernel_calls: list[str] = field(default_factory=list)

    def ref(self, package: str) -> DebRef:
        sha = self.shas.get(package, hashlib.sha256(package.encode()).hexdigest())
        return DebRef(package, f"{package}_1.0-1_amd64.deb", 1000 + len(package), sha)

    def resolve(self, packages: list[str]) -> list[DebRef]:
        self.resolve_calls.append(list(packages))
        return [self.ref(p) for p in packages]

    def resolve_kernel_package(self, meta: str = debs.KERNEL_METAPACKAGE) -> str:
        self.kernel_calls.append(meta)
        return KERNEL_PKG

    def update(self, package: str, sha: str) -> None:
        """A new package version: what `apt-get update` would bring (new lists mtime)."""
        self.shas[package] = sha
        st = self.lists.stat()
        os.utime(self.lists, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


@pytest.fixture
def fake_apt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeApt:
    apt = FakeApt(tmp_path / "apt-lists", tmp_path / "state" / "downloads")
    apt.lists.mkdir()
    monkeypatch.setattr(debs, "APT_LISTS", str(apt.lists))
    monkeypatch.setattr(debs, "resolve_kernel_package", apt.resolve_kernel_package)
    monkeypatch.setattr(debs, "resolve", apt.resolve)
    return apt


@pytest.fixture
def agent_sources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    """Temp files standing in for the agent's sources; edit them to change the key."""
    src = tmp_path / "agent-src"
    src.mkdir()
    files = [src / "__init__.py", src / "__main__.py", src / "agent_pb2.py"]
    for f in files:
        f.write_text(f"# {f.name}\n")
    monkeypatch.setattr(rootfs, "agent_files", lambda: list(files))
    return files


# --- plan() and the image key ----------------------------------------------------

def test_plan_key_is_stable(fake_apt: FakeApt, agent_sources: list[Path]) -> None:
    first, second = image.plan(fake_apt.downloads), image.plan(fake_apt.downloads)
    assert first.key == second.key
    assert len(first.key) == 20 and all(c in "0123456789abcdef" for c in first.key)
    assert first.inputs == second.inputs


def test_plan_resolves_kernel_busybox_and_python(fake_apt: FakeApt,
                                                 agent_sources: list[Path]) -> None:
    p = image.plan(fake_apt.downloads)
    assert fake_apt.kernel_calls == [debs.KERNEL_METAPACKAGE]
    assert fake_apt.resolve_calls == [[KERNEL_PKG, "busybox-static", *image.PYTHON_PACKAGES]]
    assert p.kernel.package == KERNEL_PKG
    assert p.busybox.package == "busybox-static"
    assert [r.package for r in p.python] == image.PYTHON_PACKAGES
    assert p.inputs[f"deb:{KERNEL_PKG}"] == fake_apt.ref(KERNEL_PKG).sha256
    for name in rootfs.GUEST_DISTS:
        assert p.inputs[f"dist:{name}"].count(":") == 1  # version:record-digest
    assert {"agent", "init", "recipe"} <= set(p.inputs)
    assert p.inputs["recipe"].startswith(image.RECIPE_VERSION + ":")


def test_key_changes_when_an_agent_file_changes(fake_apt: FakeApt,
                                                agent_sources: list[Path]) -> None:
    before = image.plan(fake_apt.downloads)
    agent_sources[1].write_text("# __main__.py\nprint('changed')\n")
    after = image.plan(fake_apt.downloads)
    assert after.key != before.key
    assert after.inputs["agent"] != before.inputs["agent"]
    assert {k: v for k, v in after.inputs.items() if k != "agent"} == \
        {k: v for k, v in before.inputs.items() if k != "agent"}
    agent_sources[1].write_text("# __main__.py\n")
    assert image.plan(fake_apt.downloads).key == before.key, "reverting gives the old key back"


def test_key_changes_when_an_agent_file_is_added(fake_apt: FakeApt, agent_sources: list[Path],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    before = image.plan(fake_apt.downloads).key
    extra = agent_sources[0].parent / "extra.py"
    extra.write_text("")
    monkeypatch.setattr(rootfs, "agent_files", lambda: [*agent_sources, extra])
    assert image.plan(fake_apt.downloads).key != before


@pytest.mark.parametrize("package", [KERNEL_PKG, "busybox-static", "libpython3.11-stdlib"])
def test_key_changes_when_a_deb_sha256_changes(fake_apt: FakeApt, agent_sources: list[Path],
                                               package: str) -> None:
    before = image.plan(fake_apt.downloads)
    fake_apt.update(package, "0" * 64)
    after = image.plan(fake_apt.downloads)
    assert after.key != before.key
    assert after.inputs[f"deb:{package}"] == "0" * 64
    assert {k: v for k, v in after.inputs.items() if k != f"deb:{package}"} == \
        {k: v for k, v in before.inputs.items() if k != f"deb:{package}"}


def test_plan_resolution_is_cached_until_apt_lists_change(fake_apt: FakeApt,
                                                          agent_sources: list[Path]) -> None:
    first = image.plan(fake_apt.downloads)
    assert (fake_apt.downloads / "resolved.json").is_file()
    fake_apt.shas["busybox-static"] = "1" * 64  # without an apt update: not looked up again
    assert image.plan(fake_apt.downloads).key == first.key
    assert len(fake_apt.resolve_calls) == 1 and len(fake_apt.kernel_calls) == 1
    fake_apt.update("busybox-static", "1" * 64)
    assert image.plan(fake_apt.downloads).inputs["deb:busybox-static"] == "1" * 64
    assert len(fake_apt.resolve_calls) == 2


def test_resolve_cached_ignores_a_corrupt_cache(fake_apt: FakeApt) -> None:
    cache = fake_apt.downloads / "resolved.json"
    cache.parent.mkdir(parents=True)
    for garbage in ("{not json", '{"stamp": 1}', '[]', '{"stamp": "x", "refs": [{"bad": 1}]}'):
        cache.write_text(garbage)
        refs = debs.resolve_cached([debs.KERNEL_METAPACKAGE, "busybox-static"], cache)
        assert [r.package for r in refs] == [KERNEL_PKG, "busybox-static"]
    assert json.loads(cache.read_text())["refs"][0]["package"] == KERNEL_PKG


def test_resolve_cached_key_includes_the_package_list(fake_apt: FakeApt) -> None:
    cache = fake_apt.downloads / "resolved.json"
    debs.resolve_cached([debs.KERNEL_METAPACKAGE, "busybox-static"], cache)
    refs = debs.resolve_cached([debs.KERNEL_METAPACKAGE, "busybox-static", "zstd"], cache)
    assert [r.package for r in refs] == [KERNEL_PKG, "busybox-static", "zstd"]
    assert len(fake_apt.resolve_calls) == 2


def test_resolve_cached_without_apt_lists_never_caches(fake_apt: FakeApt,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(debs, "APT_LISTS", str(fake_apt.lists / "missing"))
    cache = fake_apt.downloads / "resolved.json"
    debs.resolve_cached([debs.KERNEL_METAPACKAGE], cache)
    debs.resolve_cached([debs.KERNEL_METAPACKAGE], cache)
    assert len(fake_apt.resolve_calls) == 2


def test_key_depends_on_recipe_modules(fake_apt: FakeApt, agent_sources: list[Path],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    before = image.plan(fake_apt.downloads).key
    monkeypatch.setattr(image, "KERNEL_MODULES", [*image.KERNEL_MODULES, "vsock"])
    assert image.plan(fake_apt.downloads).key != before


def test_plan_names_a_missing_python_dist(fake_apt: FakeApt, agent_sources: list[Path],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rootfs, "GUEST_DISTS", (*rootfs.GUEST_DISTS, "no-such-dist-vmf"))
    with pytest.raises(ImageError, match="no-such-dist-vmf is not installed"):
        image.plan(fake_apt.downloads)


def test_build_plan_key_ignores_insertion_order() -> None:
    ref = DebRef("p", "p_1_amd64.deb", 1, "a" * 64)
    a = BuildPlan(ref, ref, [], {"x": "1", "y": "2"})
    b = BuildPlan(ref, ref, [], {"y": "2", "x": "1"})
    assert a.key == b.key
    assert BuildPlan(ref, ref, [], {"x": "1", "y": "3"}).key != a.key


# --- debs: apt output parsing and failures (subprocess.run faked) ----------------------

def fake_run(monkeypatch: pytest.MonkeyPatch, *, returncode: int = 0, stdout: str = "",
             stderr: str = "", side_effect: Callable[..., None] | None = None) -> list[dict]:
    calls: list[dict] = []

    def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
        calls.append({"argv": list(argv), **kwargs})
        if side_effect is not None:
            side_effect(argv, **kwargs)
        return subprocess.CompletedProcess(argv, returncode, stdout, stderr)

    monkeypatch.setattr(subprocess, "run", run)
    return calls


def test_resolve_reports_apt_error_naming_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_run(monkeypatch, returncode=100, stderr=(
        "Reading package lists...\nBuilding dependency tree...\n"
        "E: Unable to locate package nosuch\n"))
    with pytest.raises(ImageError) as info:
        debs.resolve(["nosuch"])
    message = str(info.value)
    assert "nosuch" in message
    assert "E: Unable to locate package nosuch" in message
    assert calls[0]["argv"][:3] == ["apt-get", "download", "--print-uris"]


def test_run_failure_without_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_run(monkeypatch, returncode=1, stderr="")
    with pytest.raises(ImageError, match="no output"):
        debs._run(["apt-get", "x"], "doing x")


def test_run_missing_tool(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(argv: list[str], **kwargs: Any) -> None:
        raise FileNotFoundError(argv[0])

    fake_run(monkeypatch, side_effect=missing)
    with pytest.raises(ImageError, match="apt-get is not installed"):
        debs.resolve(["busybox-static"])


PRINT_URIS = (
    "'http://deb.debian.org/debian/pool/main/b/busybox/busybox-static_1.35.0-4%2bb3_amd64.deb' "
    "busybox-static_1%3a1.35.0-4+b3_amd64.deb 1053212 SHA256:" + "b" * 64 + "\n"
    "'http://deb.debian.org/debian/pool/main/p/python3.11/python3.11-minimal_3.11.2-6_amd64.deb' "
    "python3.11-minimal_3.11.2-6_amd64.deb 2064412 SHA256:" + "c" * 64 + "\n")


def test_resolve_parses_print_uris_in_request_order(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_run(monkeypatch, stdout=PRINT_URIS)
    refs = debs.resolve(["python3.11-minimal", "busybox-static"])
    assert refs == [
        DebRef("python3.11-minimal", "python3.11-minimal_3.11.2-6_amd64.deb", 2064412, "c" * 64),
        DebRef("busybox-static", "busybox-static_1%3a1.35.0-4+b3_amd64.deb", 1053212, "b" * 64),
    ]


def test_resolve_names_packages_apt_did_not_list(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_run(monkeypatch, stdout=PRINT_URIS)
    with pytest.raises(ImageError, match="apt has no zstd"):
        debs.resolve(["busybox-static", "zstd"])


def test_resolve_requires_sha256(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_run(monkeypatch, stdout="'http://x/a_1_amd64.deb' a_1_amd64.deb 10 MD5Sum:abcd\n")
    with pytest.raises(ImageError, match="no SHA256 for a_1_amd64.deb"):
        debs.resolve(["a"])


def test_resolve_kernel_package_reads_apt_cache_depends(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_run(monkeypatch, stdout=(
        "linux-image-amd64\n  Depends: linux-image-6.1.0-99-amd64\n"
        "  Recommends: firmware-linux-free\n"))
    assert debs.resolve_kernel_package() == "linux-image-6.1.0-99-amd64"
    assert calls[0]["argv"] == ["apt-cache", "depends", "linux-image-amd64"]


def test_resolve_kernel_package_without_dependency(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_run(monkeypatch, stdout="linux-image-amd64\n  Recommends: firmware-linux-free\n")
    with pytest.raises(ImageError, match="no linux-image dependency"):
        debs.resolve_kernel_package()


def test_fetch_uses_cached_file_of_right_size(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    calls = fake_run(monkeypatch, returncode=1, stderr="E: must not download")
    data = b"deb bytes"
    (tmp_path / "a_1_amd64.deb").write_bytes(data)
    ref = DebRef("a", "a_1_amd64.deb", len(data), hashlib.sha256(data).hexdigest())
    assert debs.fetch(ref, tmp_path) == tmp_path / "a_1_amd64.deb"
    assert calls == []


def test_fetch_downloads_and_verifies(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    data = b"the real package"

    def download(argv: list[str], cwd: Path, **kwargs: Any) -> None:
        assert argv == ["apt-get", "download", "a"]
        (Path(cwd) / "a_1_amd64.deb").write_bytes(data)

    fake_run(monkeypatch, side_effect=download)
    cache = tmp_path / "downloads"
    good = DebRef("a", "a_1_amd64.deb", len(data), hashlib.sha256(data).hexdigest())
    assert debs.fetch(good, cache).read_bytes() == data

    (cache / "a_1_amd64.deb").unlink()
    bad = DebRef("a", "a_1_amd64.deb", len(data), "0" * 64)
    with pytest.raises(ImageError, match="does not match its SHA256"):
        debs.fetch(bad, cache)
    assert not (cache / "a_1_amd64.deb").exists(), "a mismatching download must be removed"


def test_fetch_reports_missing_output(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_run(monkeypatch)
    ref = DebRef("a", "a_1_amd64.deb", 5, "0" * 64)
    with pytest.raises(ImageError, match="did not produce a_1_amd64.deb"):
        debs.fetch(ref, tmp_path)


# --- rootfs helpers -----------------------------------------------------------------

def test_agent_files_include_entry_point_and_generated_proto() -> None:
    files = rootfs.agent_files()
    assert PACKAGE_ROOT / "guest" / "agent" / "__main__.py" in files
    assert PACKAGE_ROOT / "proto" / "agent_pb2.py" in files
    assert PACKAGE_ROOT / "proto" / "ttrpc_pb2.py" in files
    assert PACKAGE_ROOT / "ttrpc" / "aio.py" in files
    # The agent speaks ttrpc: neither grpc's stubs nor grpcio go into the guest.
    assert PACKAGE_ROOT / "proto" / "agent_pb2_grpc.py" not in files
    assert "grpcio" not in rootfs.GUEST_DISTS
    assert PACKAGE_ROOT / "__init__.py" in files
    assert all(f.is_file() for f in files)
    assert len(set(files)) == len(files)
    rel = [f.relative_to(PACKAGE_ROOT.parent).as_posix() for f in files]
    # The agent may import only itself, the proto package, the ttrpc package, the
    # import-free error tree and the lifecycle guard (see guest/agent/__init__).
    assert all(r.startswith(("vmfactory/guest/", "vmfactory/proto/", "vmfactory/ttrpc/"))
               or r in ("vmfactory/__init__.py", "vmfactory/errors.py", "vmfactory/util/__init__.py",
                        "vmfactory/util/states.py") for r in rel), rel
    assert not any(r.endswith("gen.py") for r in rel), "the generator is host-only"


def test_prune_stdlib_removes_listed_dirs(tmp_path: Path) -> None:
    stdlib = tmp_path / "usr/lib/python3.11"
    for d in ("test/support", "idlelib", "tkinter", "unittest/test", "json", "lib2to3/fixes",
              "config-3.11-x86_64-linux-gnu"):
        (stdlib / d).mkdir(parents=True)
        (stdlib / d / "mod.py").write_text("x = 1\n")
    (stdlib / "unittest/__init__.py").write_text("")
    (stdlib / "os.py").write_text("")
    rootfs.prune_stdlib(tmp_path)
    for gone in ("test", "idlelib", "tkinter", "unittest/test", "lib2to3",
                 "config-3.11-x86_64-linux-gnu"):
        assert not (stdlib / gone).exists(), gone
    assert (stdlib / "json/mod.py").exists()
    assert (stdlib / "unittest/__init__.py").exists()
    assert (stdlib / "os.py").exists()
    rootfs.prune_stdlib(tmp_path)  # nothing left to remove: still fine


def test_prepare_tree_is_merged_usr_and_idempotent(tmp_path: Path) -> None:
    rootfs.prepare_tree(tmp_path)
    rootfs.prepare_tree(tmp_path)
    for link, target in rootfs.MERGED_USR.items():
        assert (tmp_path / link).is_symlink()
        assert (tmp_path / link).readlink() == Path(target)
    for d in ("proc", "sys", "dev", "run", "tmp", rootfs.DIST_PACKAGES, rootfs.AGENT_ROOT):
        assert (tmp_path / d).is_dir()


def test_install_agent_keeps_package_layout(tmp_path: Path) -> None:
    rootfs.install_agent(tmp_path)
    base = tmp_path / rootfs.AGENT_ROOT
    assert (base / "vmfactory/guest/agent/__main__.py").read_bytes() == \
        (PACKAGE_ROOT / "guest/agent/__main__.py").read_bytes()
    assert (base / "vmfactory/proto/agent_pb2.py").is_file()


# --- GuestImage / ImageBuilder ------------------------------------------------------

def write_image_dir(directory: Path, key: str) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    manifest = {"key": key, "kernel_release": "6.1.0-99-amd64", "modules": ["virtio_pci"],
                "inputs": {"agent": "x"}, "built_at": 0.0, "build_seconds": 1.5,
                "size_mib": {"total": 3.0}}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_guest_image_load(tmp_path: Path) -> None:
    d = tmp_path / "images" / "abc"
    manifest = write_image_dir(d, "abc")
    img = GuestImage.load(d)
    assert img.key == "abc" and img.directory == d
    assert (img.kernel, img.initrd, img.rootfs) == (d / "kernel", d / "initrd.img",
                                                    d / "rootfs.ext4")
    assert img.kernel_release == "6.1.0-99-amd64"
    assert img.manifest == manifest


def test_guest_image_load_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        GuestImage.load(tmp_path)


FIXED_REF = DebRef("p", "p_1_amd64.deb", 1, "a" * 64)
FIXED_PLAN = BuildPlan(FIXED_REF, FIXED_REF, [FIXED_REF], {"agent": "fixed"})


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[tuple[BuildPlan, Path]]:
    """Fix plan() and record (instead of running) every build."""
    calls: list[tuple[BuildPlan, Path]] = []

    def fake_build(self: ImageBuilder, build_plan: BuildPlan, target: Path) -> GuestImage:
        calls.append((build_plan, target))
        write_image_dir(target, build_plan.key)
        return GuestImage.load(target)

    monkeypatch.setattr(image, "plan", lambda *args, **kwargs: FIXED_PLAN)
    monkeypatch.setattr(ImageBuilder, "_build", fake_build)
    return calls


def test_ensure_reuses_existing_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_build(*args: Any) -> None:
        raise AssertionError("ensure() must not build an existing image")

    monkeypatch.setattr(image, "plan", lambda *args, **kwargs: FIXED_PLAN)
    monkeypatch.setattr(ImageBuilder, "_build", no_build)
    write_image_dir(tmp_path / "images" / FIXED_PLAN.key, FIXED_PLAN.key)
    img = ImageBuilder(tmp_path, quiet=True).ensure()
    assert img.key == FIXED_PLAN.key
    assert img.directory == tmp_path / "images" / FIXED_PLAN.key


def test_ensure_builds_when_missing_or_forced(tmp_path: Path,
                                              builds: list[tuple[BuildPlan, Path]]) -> None:
    builder = ImageBuilder(tmp_path, quiet=True)
    target = tmp_path / "images" / FIXED_PLAN.key
    target.mkdir(parents=True)  # a directory without manifest is not an image
    (target / "kernel").write_bytes(b"partial")
    img = builder.ensure()
    assert builds == [(FIXED_PLAN, target)]
    assert img.key == FIXED_PLAN.key
    builder.ensure()
    assert len(builds) == 1, "second ensure() reuses the built image"
    builder.ensure(force=True)
    assert len(builds) == 2


def test_finish_writes_a_manifest_guest_image_loads(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for name, size in (("kernel", 1 << 20), ("initrd.img", 1 << 19), ("rootfs.ext4", 1 << 21)):
        (out / name).write_bytes(b"\0" * size)
    ImageBuilder._finish(FIXED_PLAN, out, "6.1.0-99-amd64", ["virtio_pci", "ext4"], 12.345)
    img = GuestImage.load(out)
    assert img.key == FIXED_PLAN.key
    assert img.kernel_release == "6.1.0-99-amd64"
    assert img.manifest["modules"] == ["virtio_pci", "ext4"]
    assert img.manifest["inputs"] == FIXED_PLAN.inputs
    assert img.manifest["build_seconds"] == 12.35
    assert img.manifest["size_mib"] == {"kernel": 1.0, "initrd.img": 0.5, "rootfs.ext4": 2.0,
                                        "total": 3.5}


def test_write_initramfs_contents(tmp_path: Path, read_newc: Callable) -> None:
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF busybox")
    modules = {}
    for name in ("virtio_ring", "virtio_pci"):
        modules[name] = tmp_path / f"{name}.ko"
        modules[name].write_bytes(f"module {name}".encode())
    initrd = tmp_path / "initrd.img"
    ImageBuilder._write_initramfs(initrd, busybox, ["virtio_ring", "virtio_pci"], modules)
    entries = {e.name: e for e in read_newc(gzip.decompress(initrd.read_bytes()))}
    assert entries["dev/console"].fields["rdevmajor"] == 5
    assert entries["dev/console"].fields["rdevminor"] == 1
    assert entries["bin/busybox"].data == b"\x7fELF busybox"
    assert entries["bin/busybox"].mode & 0o777 == 0o755
    assert entries["init"].data == image.INIT_SCRIPT.read_bytes()
    assert entries["init"].mode & 0o777 == 0o755
    assert entries["etc/modules.order"].data == b"virtio_ring\nvirtio_pci\n"
    assert entries["lib/modules/virtio_pci.ko"].data == b"module virtio_pci"
    for d in ("bin", "dev", "etc", "lib/modules", "newroot", "proc", "sys", "run"):
        assert entries[d].mode & 0o170000 == 0o040000, d


RELEASE = "6.1.0-99-amd64"
KERNEL_DEB_MEMBERS = [
    "./", "./boot/", f"./boot/vmlinuz-{RELEASE}", f"./boot/config-{RELEASE}",
    f"./usr/lib/modules/{RELEASE}/kernel/drivers/virtio/virtio_pci.ko",
    f"./usr/lib/modules/{RELEASE}/kernel/drivers/block/virtio_blk.ko",
    f"./usr/lib/modules/{RELEASE}/kernel/fs/ext4/ext4.ko",
    f"./usr/lib/modules/{RELEASE}/kernel/net/ipv4/tcp_bbr.ko",
    f"./usr/lib/modules/{RELEASE}/modules.builtin",
    "./usr/share/doc/linux-image/changelog.gz",
]


def fake_extract(monkeypatch: pytest.MonkeyPatch, boot_image: bytes) -> list[str]:
    offered: list[str] = []

    def extract(deb: Path, dest: Path, keep: Callable[[str], bool] | None = None) -> list[str]:
        written = []
        for name in KERNEL_DEB_MEMBERS:
            offered.append(name)
            if name.endswith("/") or (keep is not None and not keep(name)):
                continue
            path = dest / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(boot_image if "vmlinuz" in name else b"ko")
            written.append(name)
        return written

    monkeypatch.setattr(debs, "extract", extract)
    return offered


def test_unpack_kernel_keeps_kernel_and_selected_modules(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    vmlinux = b"\x7fELF" + b"kernel" * 100
    fake_extract(monkeypatch, b"MZ setup code" + lzma.compress(vmlinux, format=lzma.FORMAT_XZ))
    out = tmp_path / "out"
    out.mkdir()
    release, modules = ImageBuilder._unpack_kernel(tmp_path / "k.deb", tmp_path / "work", out)
    assert release == RELEASE
    assert set(modules) == {"virtio_pci", "virtio_blk", "ext4"}
    assert (out / "kernel").read_bytes() == vmlinux, "the ELF inside the bzImage is used"
    assert not (tmp_path / "work/kernel/boot" / f"config-{RELEASE}").exists()


def test_unpack_kernel_falls_back_to_bzimage(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    bzimage = b"MZ a kernel compressed with zstd"
    fake_extract(monkeypatch, bzimage)
    out = tmp_path / "out"
    out.mkdir()
    ImageBuilder._unpack_kernel(tmp_path / "k.deb", tmp_path / "work", out)
    assert (out / "kernel").read_bytes() == bzimage


def test_unpack_kernel_without_vmlinuz(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(debs, "extract", lambda deb, dest, keep=None: [])
    with pytest.raises(ImageError, match="has no /boot/vmlinuz"):
        ImageBuilder._unpack_kernel(tmp_path / "k.deb", tmp_path / "work", tmp_path)
