"""The command line: the README's main job, and one-line errors with exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import qemu_pids_under
from vmfactory.config import Config, scratch_config
from vmfactory.guest.image import GuestImage


def vmfactory(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmfactory.cli", *args], capture_output=True,
                          text=True, timeout=240, check=False)


def _config_file(tmp_path: Path, config: Config, extra: str = "") -> Path:
    path = tmp_path / "vmfactory.toml"
    path.write_text(f'[paths]\nrun_dir = "{config.paths.run_dir}"\n'
                    f'[vm]\naccel = "tcg"\n{extra}')
    return path


@pytest.mark.qemu
def test_boot_prints_timings_and_leaves_nothing(tmp_path: Path, config: Config,
                                               guest_image: GuestImage) -> None:
    before = set(config.paths.run_dir.iterdir())
    proc = vmfactory("--config", str(_config_file(tmp_path, config)), "boot", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    t = result["timings_ms"]
    assert 0 < t["qemu_start_ms"] < t["agent_ready_ms"]
    assert 0 < t["guest_init_s"] < t["guest_agent_ready_s"]
    assert result["accel"] == "tcg" and result["reseeded"] is True
    assert result["kernel"] == guest_image.kernel_release
    assert abs(result["clock_skew_after_set_ms"]) < 1000
    assert "cold boot to agent ready" in proc.stderr  # progress lines
    vms = config.paths.vms_dir  # removed once empty: earlier tests may have left it
    assert set(config.paths.run_dir.iterdir()) - {vms} == before - {vms}
    assert not vms.exists() or not list(vms.iterdir())
    assert not qemu_pids_under(config.paths.run_dir)


@pytest.mark.parametrize("extra, key", [
    ("memory_mib = -1\n", "vm.memory_mib"),
    ("cpus = \"two\"\n", "vm.cpus"),
    ("accel = \"xen\"\n", "vm.accel"),
    ("turbo = true\n", "vm.turbo"),
])
def test_bad_config_exits_2_with_one_line(tmp_path: Path, config: Config, extra: str,
                                          key: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f"[vm]\n{extra}")
    proc = vmfactory("--config", str(path), "boot")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0]


def test_bad_cli_value_exits_2(config: Config) -> None:
    proc = vmfactory("boot", "--memory", "12")
    assert proc.returncode == 2
    assert proc.stderr.strip() == \
        "vmfactory: config vm.memory_mib: 12 is out of range [128, 1048576]"


@pytest.mark.qemu
def test_boot_failure_exits_1_with_one_line(tmp_path: Path, config: Config,
                                            guest_image: GuestImage) -> None:
    path = _config_file(tmp_path, config, "")
    path.write_text(path.read_text() + f'[image]\nkernel = "{tmp_path / "missing"}"\n')
    proc = vmfactory("--config", str(path), "boot")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vmfactory: error: qemu-start: kernel not found")


@pytest.mark.qemu
def test_demo_serves_a_vm_from_the_warm_pool(tmp_path: Path, config: Config,
                                             guest_image: GuestImage) -> None:
    root = config.paths.run_dir
    # Sockets go under the session's short run root (unix path limit), records in tmp_path.
    path = scratch_config(tmp_path, {
        "paths": {"run_dir": str(root), "template_dir": str(root / "demo-templates")},
        "vm": {"accel": "tcg"},
        "daemon": {"socket": str(root / "demo.sock")},
        "store": {"url": f"leveldb://{tmp_path / 'store.ldb'}"},
        "pools": [{"name": "demo", "min_size": 1, "max_size": 1}]})
    before = set(root.iterdir())
    proc = vmfactory("--config", str(path), "demo", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["source"] == "pool" and result["pool"] == "demo"
    assert result["get_ms"] > 0 and result["template_build_s"] > 0
    assert abs(result["clock_skew_ms"]) < 1000 and len(result["random"]) == 32
    assert "GetVM over gRPC" in proc.stderr  # progress lines
    # The main job ends with a container: its output relayed, its exit code, timings.
    container = result["container"]
    assert container["exit_code"] == 0 and container["source"] == "pool"
    assert container["output"].startswith("hello from demo-") and "PID 2," in container["output"]
    assert 0 < container["create_ms"] < container["first_output_ms"]
    # The daemon stopped everything: no socket, VM run directory, template or QEMU.
    assert set(root.iterdir()) <= before
    assert not qemu_pids_under(root)
