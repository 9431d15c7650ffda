"""A bundle's confinement applied in a real guest (real daemon, real QEMU):
mounts as podman writes them (kernel file systems, copied files, /dev/shm, a
read-only directory bind as a disk), rlimits, capabilities, no_new_privs, the
OOM score, masked and read-only paths, sysctls and cgroup limits; a writable
directory bind refused with one line and nothing left."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime_client.bundles.busybox import make_busybox_bundle
from tests.runtime.conftest import RuntimeDaemon, cli
from tests.runtime.test_confine import podman_like

pytestmark = pytest.mark.qemu

CAPS = ["CAP_CHOWN", "CAP_KILL", "CAP_SETUID", "CAP_SETGID"]
SCRIPT = r"""
cat /etc/hosts; echo "hostname=$(cat /etc/hostname)"
echo "nofile=$(ulimit -n)/$(ulimit -Hn)"
grep -E '^(CapBnd|CapEff|NoNewPrivs)' /proc/self/status
echo "oom=$(cat /proc/self/oom_score_adj)"
echo "data=$(cat /data/marker)"
(echo x > /data/new) 2>/dev/null && echo data-writable || echo data-readonly
(echo x > /etc/hostname) 2>/dev/null && echo hostname-writable || echo hostname-readonly
echo "kcore=$(cat /proc/kcore | wc -c)"
(echo y > /proc/sys/kernel/domainname) 2>/dev/null && echo procsys-writable || echo procsys-readonly
echo "domain=$(cat /proc/sys/kernel/domainname)"
cg=$(cut -d: -f3 /proc/self/cgroup)
echo "memory=$(cat /sys/fs/cgroup$cg/memory.max) pids=$(cat /sys/fs/cgroup$cg/pids.max) cpu=$(cat /sys/fs/cgroup$cg/cpu.max)"
grep -oE ' /dev/(shm|mqueue|pts) [a-z]+' /proc/mounts | sort | tr '\n' ';'; echo
"""


def confined_bundle(tmp_path: Path) -> Path:
    bundle = make_busybox_bundle(tmp_path / "bundle", ("sh", "-c", SCRIPT))
    config = json.loads((bundle / "config.json").read_text())
    config.update(podman_like(tmp_path))
    (tmp_path / "data" / "marker").write_text("from the host")
    config["process"].update({
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 1000}],
        "capabilities": {k: CAPS for k in ("bounding", "effective", "permitted")},
        "noNewPrivileges": True, "oomScoreAdj": 321})
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


def test_the_bundles_confinement_holds_in_the_guest(runtime_daemon: RuntimeDaemon,
                                                    tmp_path: Path) -> None:
    out = cli(runtime_daemon.config, "run", "--rm", str(confined_bundle(tmp_path)),
              timeout=300)
    text = out.stdout.decode(errors="replace")
    assert out.returncode == 0, (text, out.stderr.decode(errors="replace"))
    lines = text.splitlines()
    assert "127.0.0.1 localhost" in lines and "hostname=vmf-test" in lines
    assert "nofile=1000/4096" in lines
    mask = f"{(1 << 0) | (1 << 5) | (1 << 6) | (1 << 7):016x}"
    assert f"CapBnd:\t{mask}" in lines and f"CapEff:\t{mask}" in lines, text
    assert "NoNewPrivs:\t1" in lines and "oom=321" in lines
    assert "data=from the host" in lines and "data-readonly" in lines
    assert "hostname-readonly" in lines  # bound with "ro"
    assert "kcore=0" in lines            # masked: /dev/null over it
    assert "procsys-readonly" in lines   # a read-only path
    assert "domain=example.org" in lines  # a sysctl, in the container's UTS namespace
    assert f"memory={64 << 20} pids=2048 cpu=50000 100000" in lines
    assert " /dev/mqueue mqueue; /dev/pts devpts; /dev/shm tmpfs;" in lines
    assert runtime_daemon.leases() == []


def test_a_writable_directory_bind_is_refused_with_one_line(runtime_daemon: RuntimeDaemon,
                                                            tmp_path: Path) -> None:
    bundle = make_busybox_bundle(tmp_path / "bundle", ("true",))
    (tmp_path / "vol").mkdir()
    config = json.loads((bundle / "config.json").read_text())
    config["mounts"] = [{"destination": "/vol", "type": "bind", "source": str(tmp_path / "vol"),
                         "options": ["rbind", "rw"]}]
    (bundle / "config.json").write_text(json.dumps(config))
    before = runtime_daemon.handouts()
    out = cli(runtime_daemon.config, "run", "--rm", str(bundle))
    err = out.stderr.decode(errors="replace").strip().splitlines()
    assert out.returncode == 125 and len(err) == 1, err
    assert "mounts[0]" in err[0] and "/vol" in err[0] and "writable" in err[0]
    assert runtime_daemon.handouts() == before  # refused before any VM was asked for
    assert runtime_daemon.leases() == [] and runtime_daemon.sandbox_dirs() == []
