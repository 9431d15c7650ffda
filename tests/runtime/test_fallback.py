"""CreateNew in the client: with no daemon answering and ``runtime.fallback =
"createnew"``, ``vmfactory-runtime`` boots its own QEMU, runs the container on it
(its root disk hot-plugged by the client, not the daemon) and leaves nothing.

Slow (one cold TCG boot per test): the cold path a node without its daemon takes.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import qemu_pids_under
from tests.runtime.conftest import cli, client_processes
from tests.server.conftest import write_config
from vmfactory.guest.image import GuestImage

pytestmark = pytest.mark.qemu

COLD_TIMEOUT_S = 240  # a cold TCG boot is 6-15 s here; a loaded CI machine is slower


@pytest.fixture
def lone_config(guest_image: GuestImage) -> Iterator[Path]:
    """A config whose daemon socket nobody serves."""
    root = Path(tempfile.mkdtemp(prefix="vmfc-", dir="/tmp"))
    try:
        yield write_config(root, runtime={"fallback": "createnew"})
        assert not qemu_pids_under(root), "the client's QEMU outlived the sandbox"
        assert not client_processes(root), "proxy/shim processes left"
        for shared in ("vms", "sandboxes"):  # parents every client shares: may stay
            d = root / "run" / shared
            assert not d.exists() or not list(d.iterdir()), f"left in {d}: {list(d.iterdir())}"
        with open("/proc/mounts") as f:
            assert str(root) not in f.read()
    finally:
        for pid in qemu_pids_under(root):  # a failed test must not leak into the next
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


def test_a_container_runs_on_a_vm_the_client_booted(lone_config: Path,
                                                    busybox_bundle: Path) -> None:
    assert not (lone_config.parent / "factory.sock").exists()
    out = cli(lone_config, "run", "--rm", str(busybox_bundle), "--", "sh", "-c",
              "cat /proc/1/comm; echo from-createnew; exit 4", timeout=COLD_TIMEOUT_S)
    err = out.stderr.decode(errors="replace")
    assert out.returncode == 4, err
    assert out.stdout.splitlines()[-1] == b"from-createnew", out.stdout
    assert "booting a VM in this process" in err


def test_fail_policy_refuses_without_a_daemon(lone_config: Path,
                                              busybox_bundle: Path) -> None:
    text = lone_config.read_text().replace('fallback = "createnew"', 'fallback = "fail"')
    assert text != lone_config.read_text()
    lone_config.write_text(text)
    out = cli(lone_config, "run", "--rm", str(busybox_bundle), "--", "true", timeout=60)
    err = out.stderr.decode(errors="replace").strip()
    assert out.returncode != 0
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
