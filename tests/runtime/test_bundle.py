"""OCI bundle loading, in-rootfs executable lookup, and the ext4 image cache (no QEMU)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from runtime_client.bundles import images as bundle_mod
from runtime_client.bundles import (
    DEFAULT_PATH,
    Bundle,
    ImageCache,
    ProcessSpec,
    User,
    find_executable,
    load_bundle,
)
from runtime_client.errors import BundleError, ClientError
from runtime_client.bundles.busybox import make_busybox_bundle, static_busybox

pytestmark = pytest.mark.skipif(shutil.which("busybox") is None,
                                reason="busybox-static is not installed")


@pytest.fixture
def bb(tmp_path: Path) -> Path:
    return make_busybox_bundle(tmp_path / "bundle", ("sh", "-c", "echo hi"),
                               env=("FOO=bar",), cwd="/tmp", hostname="box")


def edit_config(bundle_dir: Path, **changes: Any) -> None:
    config = json.loads((bundle_dir / "config.json").read_text())
    for key, value in changes.items():
        if "__" in key:
            outer, inner = key.split("__")
            config[outer][inner] = value
        elif value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (bundle_dir / "config.json").write_text(json.dumps(config))


def load_error(path: Path) -> str:
    with pytest.raises(BundleError) as info:
        load_bundle(path)
    message = str(info.value)
    assert isinstance(info.value, ClientError)
    assert "\n" not in message
    assert f"bundle {path}" in message
    return message


# --------------------------------------------------------------------------- loading


def test_busybox_bundle_loads_with_its_fields(bb: Path) -> None:
    loaded = load_bundle(str(bb))
    assert loaded == Bundle(
        path=bb.resolve(), rootfs=(bb / "rootfs").resolve(),
        process=ProcessSpec(args=("sh", "-c", "echo hi"), env=("PATH=/bin:/sbin", "FOO=bar"),
                            cwd="/tmp", user=User(0, 0, ()), terminal=False),
        hostname="box", readonly_root=False)
    assert (loaded.rootfs / "bin" / "busybox").is_file()
    assert os.readlink(loaded.rootfs / "bin" / "sh") == "busybox"
    assert oct((loaded.rootfs / "tmp").stat().st_mode & 0o7777) == oct(0o1777)


def test_unknown_keys_ignored_and_defaults_applied(tmp_path: Path) -> None:
    b = make_busybox_bundle(tmp_path / "b")
    config = {"ociVersion": "1.1.0-rc.1", "process": {"args": ["true"]},
              "mounts": [{"destination": "/proc", "type": "proc"}],
              "linux": {"namespaces": [{"type": "pid"}]}, "hooks": {}}
    (b / "config.json").write_text(json.dumps(config))
    loaded = load_bundle(b)
    assert loaded.process == ProcessSpec(args=("true",))
    assert loaded.process.env == (f"PATH={DEFAULT_PATH}",)
    assert loaded.hostname == "" and loaded.readonly_root is False
    assert loaded.rootfs == (b / "rootfs").resolve()


def test_path_default_appended_when_env_lacks_it(bb: Path) -> None:
    edit_config(bb, process__env=["A=1", "PATHX=nope"])
    assert load_bundle(bb).process.env == ("A=1", "PATHX=nope", f"PATH={DEFAULT_PATH}")


def test_user_and_terminal_and_readonly(bb: Path) -> None:
    edit_config(bb, process__user={"uid": 1000, "gid": 100, "additionalGids": [4, 27]},
                process__terminal=True, root={"path": "rootfs", "readonly": True})
    loaded = load_bundle(bb)
    assert loaded.process.user == User(1000, 100, (4, 27))
    assert loaded.process.terminal is True
    assert loaded.readonly_root is True


def test_absolute_root_path_allowed(tmp_path: Path) -> None:
    b = make_busybox_bundle(tmp_path / "b")
    moved = tmp_path / "elsewhere"
    (b / "rootfs").rename(moved)
    edit_config(b, root={"path": str(moved)})
    assert load_bundle(b).rootfs == moved.resolve()


def test_missing_directory(tmp_path: Path) -> None:
    assert "no such directory" in load_error(tmp_path / "nope")


def test_bundle_path_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    assert "not a directory" in load_error(tmp_path / "f")


def test_missing_config(bb: Path) -> None:
    (bb / "config.json").unlink()
    assert "config.json is missing" in load_error(bb)


def test_invalid_json_reports_line_and_column(bb: Path) -> None:
    (bb / "config.json").write_text('{\n  "process": {"args": ["sh"],}\n}')
    message = load_error(bb)
    assert "invalid JSON at line 2 column" in message


def test_config_not_an_object(bb: Path) -> None:
    (bb / "config.json").write_text("[1, 2]")
    assert "top level must be an object" in load_error(bb)


@pytest.mark.parametrize("args", [[], "sh", None, ["sh", 3], ["a\0b"]])
def test_bad_args(bb: Path, args: Any) -> None:
    edit_config(bb, process__args=args)
    message = load_error(bb)
    assert "config.json: process.args" in message
    assert "non-empty list of strings" in message or "NUL" in message


def test_missing_process(bb: Path) -> None:
    edit_config(bb, process=None)
    assert "process is required" in load_error(bb)


def test_env_entry_without_equals(bb: Path) -> None:
    edit_config(bb, process__env=["PATH=/bin", "JUSTAKEY"])
    message = load_error(bb)
    assert "process.env[1] is not KEY=VALUE" in message and "JUSTAKEY" in message


def test_env_entry_with_empty_key(bb: Path) -> None:
    edit_config(bb, process__env=["=value"])
    assert "process.env[0] is not KEY=VALUE" in load_error(bb)


def test_relative_cwd(bb: Path) -> None:
    edit_config(bb, process__cwd="tmp")
    assert "process.cwd must be an absolute path" in load_error(bb)


@pytest.mark.parametrize("uid", [-1, 2**32 - 1, 2**40, "0", True, 1.0])
def test_uid_out_of_range(bb: Path, uid: Any) -> None:
    edit_config(bb, process__user={"uid": uid, "gid": 0})
    assert "process.user.uid must be an integer in 0..4294967294" in load_error(bb)


def test_max_uid_accepted(bb: Path) -> None:
    edit_config(bb, process__user={"uid": 2**32 - 2, "gid": 2**32 - 2})
    assert load_bundle(bb).process.user == User(2**32 - 2, 2**32 - 2)


def test_bad_additional_gids(bb: Path) -> None:
    edit_config(bb, process__user={"uid": 0, "gid": 0, "additionalGids": [1, "2"]})
    assert "process.user.additionalGids[1]" in load_error(bb)


def test_terminal_not_bool(bb: Path) -> None:
    edit_config(bb, process__terminal="yes")
    assert "process.terminal must be true or false" in load_error(bb)


def test_oci_version_not_string(bb: Path) -> None:
    edit_config(bb, ociVersion=1)
    assert "ociVersion must be a string" in load_error(bb)


@pytest.mark.parametrize("hostname, problem", [
    ("x" * 65, "longer than 64"), ("a/b", "must not contain"), (7, "must be a string")])
def test_bad_hostname(bb: Path, hostname: Any, problem: str) -> None:
    edit_config(bb, hostname=hostname)
    assert problem in load_error(bb)


def test_missing_rootfs_dir(bb: Path) -> None:
    shutil.rmtree(bb / "rootfs")
    message = load_error(bb)
    assert "rootfs directory missing" in message and str(bb / "rootfs") in message


def test_root_path_is_a_file(bb: Path) -> None:
    (bb / "afile").write_text("")
    edit_config(bb, root={"path": "afile"})
    assert "root.path is not a directory" in load_error(bb)


def test_with_args_and_terminal(bb: Path) -> None:
    process = load_bundle(bb).process
    changed = process.with_args(["echo", "x"]).with_terminal(True)
    assert changed.args == ("echo", "x") and changed.terminal is True
    assert changed.env == process.env and process.args == ("sh", "-c", "echo hi")
    for bad in ([], "sh", ["ok", "a\0"]):
        with pytest.raises(BundleError):
            process.with_args(bad)


# --------------------------------------------------------------------------- find_executable


def test_find_executable_via_path_and_symlink(bb: Path) -> None:
    loaded = load_bundle(bb)
    assert find_executable(loaded) == "/bin/sh"  # process.args[0]
    assert find_executable(loaded, "/bin/echo") == "/bin/echo"
    assert find_executable(loaded, "busybox") == "/bin/busybox"


def test_find_executable_misses(bb: Path) -> None:
    rootfs = bb / "rootfs"
    (rootfs / "bin" / "plain").write_text("#!/bin/sh\n")
    (rootfs / "bin" / "plain").chmod(0o644)
    # Exists on the host, not in the rootfs: must not be found through the link.
    (rootfs / "bin" / "escape").symlink_to("/usr/bin/env")
    (rootfs / "bin" / "dotdot").symlink_to("../../../../../../../../usr/bin/env")
    (rootfs / "bin" / "loop").symlink_to("loop")
    loaded = load_bundle(bb)
    for name in ("nope", "plain", "escape", "dotdot", "loop", "/bin", "/nope/sh", ""):
        assert find_executable(loaded, name) is None, name


def test_find_executable_symlinks_stay_inside_root(bb: Path) -> None:
    rootfs = bb / "rootfs"
    (rootfs / "usr" / "bin").mkdir(parents=True)
    # Absolute target: relative to the rootfs, not the host.
    (rootfs / "usr" / "bin" / "abs").symlink_to("/bin/busybox")
    # ".." past the root stays at the root, as in a chroot.
    (rootfs / "usr" / "bin" / "up").symlink_to("../../../../../bin/busybox")
    (rootfs / "lib").symlink_to("usr")  # directory link in the middle of a path
    edit_config(bb, process__env=["PATH=/nowhere::/lib/bin"])
    loaded = load_bundle(bb)
    assert find_executable(loaded, "abs") == "/lib/bin/abs"
    assert find_executable(loaded, "up") == "/lib/bin/up"
    assert find_executable(loaded, "/usr/bin/abs") == "/usr/bin/abs"


def test_find_executable_relative_name_uses_cwd(bb: Path) -> None:
    loaded = load_bundle(bb)  # cwd is /tmp
    (loaded.rootfs / "tmp" / "tool").symlink_to("/bin/busybox")
    assert find_executable(loaded, "./tool") == "/tmp/tool"
    assert find_executable(loaded, "../bin/ls") == "/bin/ls"


def test_find_executable_gives_up_after_40_hops(bb: Path) -> None:
    bin_dir = bb / "rootfs" / "bin"
    for i in range(41):
        (bin_dir / f"hop{i}").symlink_to(f"hop{i + 1}" if i < 40 else "busybox")
    loaded = load_bundle(bb)
    assert find_executable(loaded, "hop1") == "/bin/hop1"  # 40 hops: allowed
    assert find_executable(loaded, "hop0") is None  # 41 hops: ELOOP


# --------------------------------------------------------------------------- images


def is_ext4(image: Path) -> bool:
    with open(image, "rb") as f:
        f.seek(1080)
        return struct.unpack("<H", f.read(2))[0] == 0xEF53


def debugfs_cat(image: Path, path: str) -> bytes:
    proc = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)],
                          capture_output=True, check=True)
    return proc.stdout


def builds(caplog: pytest.LogCaptureFixture) -> int:
    return sum("built image" in r.getMessage() for r in caplog.records)


@pytest.fixture
def cache(tmp_path: Path) -> ImageCache:
    return ImageCache(tmp_path / "cache")


def test_image_is_ext4_with_the_rootfs_contents(bb: Path, cache: ImageCache) -> None:
    if shutil.which("debugfs") is None:
        pytest.skip("debugfs (e2fsprogs) is not installed")
    image = cache.image_for(bb / "rootfs")
    assert image.parent == cache.directory and image.name.endswith(".ext4")
    assert len(image.stem) == 24
    assert is_ext4(image)
    assert image.stat().st_mode & 0o777 == 0o444
    assert cache.directory.stat().st_mode & 0o777 == 0o700
    host = hashlib.sha256(static_busybox().read_bytes()).hexdigest()
    assert hashlib.sha256(debugfs_cat(image, "/bin/busybox")).hexdigest() == host
    assert debugfs_cat(image, "/etc/passwd").startswith(b"root:x:0:0:")
    assert [p.name for p in cache.directory.iterdir() if p.name.startswith(".build-")] == []


def test_same_rootfs_reuses_image(bb: Path, cache: ImageCache,
                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="runtime_client.bundles.images")
    first = cache.image_for(bb / "rootfs")
    inode = first.stat().st_ino
    os.utime(first, ns=(1, 1))
    second = ImageCache(cache.directory).image_for(bb / "rootfs")
    assert second == first and second.stat().st_ino == inode
    assert builds(caplog) == 1
    assert second.stat().st_mtime_ns > 1  # touched on reuse, for LRU pruning


def test_changed_rootfs_gets_new_image(bb: Path, cache: ImageCache,
                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="runtime_client.bundles.images")
    first = cache.image_for(bb / "rootfs")
    (bb / "rootfs" / "etc" / "hostname").write_text("box\n")
    second = cache.image_for(bb / "rootfs")
    assert second != first and first.exists() and second.exists()
    assert builds(caplog) == 2
    os.chmod(bb / "rootfs" / "etc" / "hostname", 0o600)  # metadata only: still a change
    assert cache.image_for(bb / "rootfs") not in (first, second)


def test_concurrent_builds_of_one_rootfs_build_once(bb: Path, cache: ImageCache,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="runtime_client.bundles.images")
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(
        ImageCache(cache.directory).image_for(bb / "rootfs"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len(set(results)) == 1
    assert builds(caplog) == 1


def test_prune_keeps_most_recently_used(bb: Path, cache: ImageCache) -> None:
    roots = []
    for i in range(4):
        root = shutil.copytree(bb / "rootfs", bb / f"rootfs{i}", symlinks=True)
        (root / "marker").write_text(str(i))
        roots.append(root)
    images = [cache.image_for(root) for root in roots]
    assert len(set(images)) == 4
    for i, image in enumerate(images):
        os.utime(image, (1_000_000 + i, 1_000_000 + i))
    assert cache.image_for(roots[0]) == images[0]  # reusing the oldest makes it the newest
    assert cache.prune(keep=2) == 2
    assert sorted(cache.directory.glob("*.ext4")) == sorted([images[0], images[3]])
    assert cache.prune(keep=2) == 0
    assert cache.prune(keep=0) == 2
    assert list(cache.directory.glob("*.ext4")) == []
    assert list(cache.directory.glob(".*.lock")) == []


def test_prune_of_missing_cache_is_zero(tmp_path: Path) -> None:
    assert ImageCache(tmp_path / "never").prune() == 0


def test_mkfs_failure_leaves_no_temp_files(bb: Path, cache: ImageCache,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bundle_mod, "MKFS", "false")
    with pytest.raises(BundleError, match="false failed for .*exit status 1"):
        cache.image_for(bb / "rootfs")
    leftovers = [p.name for p in cache.directory.iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


def test_mkfs_failure_reports_last_stderr_line(bb: Path, cache: ImageCache, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "fake-mkfs"
    fake.write_text("#!/bin/sh\necho 'first line' >&2\necho 'disk on fire' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(bundle_mod, "MKFS", str(fake))
    with pytest.raises(BundleError) as info:
        cache.image_for(bb / "rootfs")
    assert str(info.value).endswith(": disk on fire")
    assert list(cache.directory.glob("*.ext4")) == []
    assert list(cache.directory.glob(".build-*")) == []


def test_mkfs_missing(bb: Path, cache: ImageCache, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bundle_mod, "MKFS", "/nonexistent/mkfs.ext4")
    with pytest.raises(BundleError, match=r"is not installed \(apt-get install e2fsprogs\)"):
        cache.image_for(bb / "rootfs")


def test_image_for_missing_rootfs(cache: ImageCache, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="rootfs directory missing"):
        cache.image_for(tmp_path / "nothing")
