"""The confining parts of an OCI config as engines write them: mounts translated
for a VM, process limits and capabilities, paths, sysctls and resources; bad
values refused naming the field (no QEMU)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from runtime_client.bundles import load_bundle
from runtime_client.bundles.confine import MAX_FILE_BYTES, Mount, Resources
from runtime_client.bundles.busybox import make_busybox_bundle, static_busybox
from runtime_client.errors import BundleError

pytestmark = pytest.mark.skipif(not os.path.exists("/bin/busybox"),
                                reason="busybox-static is not installed")


def podman_like(tmp_path: Path) -> dict[str, Any]:
    """The mounts and limits podman 4.3 wrote here (`-v DIR:/data:ro` added)."""
    userdata = tmp_path / "userdata"
    (userdata / "shm").mkdir(parents=True)
    (userdata / "hosts").write_text("127.0.0.1 localhost\n")
    (userdata / "hostname").write_text("vmf-test\n")
    (userdata / ".containerenv").write_text("engine=\"podman-4.3.1\"\n")
    (tmp_path / "data").mkdir()
    bind = ["bind", "rprivate"]
    return {
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/etc/hosts", "type": "bind", "source": str(userdata / "hosts"),
             "options": bind},
            {"destination": "/dev/shm", "type": "bind", "source": str(userdata / "shm"),
             "options": [*bind, "nosuid", "noexec", "nodev"]},
            {"destination": "/run/.containerenv", "type": "bind",
             "source": str(userdata / ".containerenv"), "options": bind},
            {"destination": "/etc/hostname", "type": "bind",
             "source": str(userdata / "hostname"), "options": [*bind, "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["rprivate", "nosuid", "noexec", "nodev", "relatime", "ro"]},
            {"destination": "/data", "type": "bind", "source": str(tmp_path / "data"),
             "options": ["ro", "rprivate", "rbind"]},
        ],
        "linux": {"resources": {"devices": [{"allow": False, "access": "rwm"}],
                                "pids": {"limit": 2048}, "memory": {"limit": 64 << 20},
                                "cpu": {"quota": 50000, "period": 100000}},
                  "maskedPaths": ["/proc/kcore", "/sys/firmware"],
                  "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"],
                  "sysctl": {"kernel.domainname": "example.org"},
                  "seccomp": {"defaultAction": "SCMP_ACT_ERRNO"}, "cgroupsPath": "x:y:z"},
    }


def bundle_with(tmp_path: Path, extra: dict[str, Any], process: dict[str, Any] | None = None
                ) -> Path:
    bundle = make_busybox_bundle(tmp_path / "bundle", ("true",))
    config = json.loads((bundle / "config.json").read_text())
    config.update(extra)
    config["process"].update(process or {})
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


def test_podmans_bundle_translates_for_a_vm(tmp_path: Path) -> None:
    static_busybox()
    c = load_bundle(bundle_with(tmp_path, podman_like(tmp_path))).confinement
    kinds = {m.destination: m.type for m in c.mounts}
    assert kinds == {"/proc": "proc", "/dev": "tmpfs", "/sys": "sysfs", "/dev/pts": "devpts",
                     "/dev/mqueue": "mqueue", "/etc/hosts": "file", "/dev/shm": "tmpfs",
                     "/run/.containerenv": "file", "/etc/hostname": "file",
                     "/sys/fs/cgroup": "cgroup", "/data": "dir"}
    by = {m.destination: m for m in c.mounts}
    assert by["/etc/hosts"].data == b"127.0.0.1 localhost\n"
    assert by["/etc/hosts"].options == ()
    assert by["/etc/hostname"].options == ("ro",)
    assert by["/dev/shm"].options == ("nosuid", "noexec", "nodev", "mode=1777")
    assert by["/data"] == Mount("dir", "/data", ("ro",), source=tmp_path / "data")
    assert c.resources == Resources(memory_limit=64 << 20, cpu_quota=50000,
                                    cpu_period=100000, pids_limit=2048)
    assert c.masked_paths == ("/proc/kcore", "/sys/firmware")
    assert c.readonly_paths == ("/proc/sys", "/proc/sysrq-trigger")
    assert c.sysctl == (("kernel.domainname", "example.org"),)


def test_process_limits_and_capabilities(tmp_path: Path) -> None:
    caps = ["CAP_CHOWN", "CAP_KILL", "CAP_FUTURE_ONE"]  # unknown names pass: the guest ignores them
    p = load_bundle(bundle_with(tmp_path, {}, {
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 20000, "soft": 1024}],
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
        "noNewPrivileges": True, "oomScoreAdj": 500})).process.limits
    assert p.rlimits == (("RLIMIT_NOFILE", 1024, 20000),)
    assert p.capabilities is not None and p.capabilities["bounding"] == tuple(caps)
    assert p.capabilities["ambient"] == ()
    assert p.no_new_privileges and p.oom_score_adj == 500


def test_no_capabilities_key_means_the_guests_defaults(tmp_path: Path) -> None:
    assert load_bundle(bundle_with(tmp_path, {})).process.limits.capabilities is None


@pytest.mark.parametrize("extra, process, field", [
    ({}, {"rlimits": [{"type": "RLIMIT_BOGUS", "hard": 1, "soft": 1}]}, "process.rlimits[0].type"),
    ({}, {"rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1, "soft": 2}]}, "process.rlimits[0]"),
    ({}, {"rlimits": [{"type": "RLIMIT_NOFILE", "hard": -1, "soft": 1}]}, "process.rlimits[0].hard"),
    ({}, {"oomScoreAdj": 5000}, "process.oomScoreAdj"),
    ({}, {"capabilities": {"bounding": ["chown"]}}, "process.capabilities.bounding[0]"),
    ({}, {"noNewPrivileges": "yes"}, "process.noNewPrivileges"),
    ({"mounts": [{"destination": "relative", "type": "tmpfs"}]}, {}, "mounts[0].destination"),
    ({"mounts": [{"destination": "/a/../b", "type": "tmpfs"}]}, {}, "mounts[0].destination"),
    ({"mounts": [{"destination": "/", "type": "tmpfs"}]}, {}, "mounts[0]"),
    ({"mounts": [{"destination": "/x", "type": "nfs"}]}, {}, "mounts[0]"),
    ({"mounts": [{"destination": "/x", "type": "tmpfs", "options": ["a,b"]}]}, {},
     "mounts[0].options"),
    ({"mounts": [{"destination": "/x", "type": "bind", "source": "/no/such/file"}]}, {},
     "mounts[0]"),
    ({"mounts": [{"destination": "/x", "type": "bind", "source": "/dev/null"}]}, {},
     "mounts[0]"),
    ({"linux": {"sysctl": {"../../etc": "1"}}}, {}, "linux.sysctl"),
    ({"linux": {"resources": {"memory": {"limit": "lots"}}}}, {}, "linux.resources.memory.limit"),
    ({"linux": {"maskedPaths": ["proc/kcore"]}}, {}, "linux.maskedPaths[0]"),
    ({"linux": []}, {}, "linux"),
])
def test_bad_values_name_their_field(tmp_path: Path, extra: dict[str, Any],
                                     process: dict[str, Any], field: str) -> None:
    with pytest.raises(BundleError) as err:
        load_bundle(bundle_with(tmp_path, extra, process))
    message = str(err.value)
    assert field in message and "\n" not in message, message


def test_a_writable_directory_bind_is_refused_naming_the_mount(tmp_path: Path) -> None:
    (tmp_path / "vol").mkdir()
    with pytest.raises(BundleError) as err:
        load_bundle(bundle_with(tmp_path, {"mounts": [
            {"destination": "/vol", "type": "bind", "source": str(tmp_path / "vol"),
             "options": ["rbind"]}]}))
    assert "mounts[0]" in str(err.value) and "/vol" in str(err.value)
    assert "writable" in str(err.value)


def test_a_bound_file_is_bounded(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"x" * (MAX_FILE_BYTES + 1))
    with pytest.raises(BundleError, match="larger than"):
        load_bundle(bundle_with(tmp_path, {"mounts": [
            {"destination": "/big", "type": "bind", "source": str(big), "options": ["bind"]}]}))
