"""Shared fixtures: a real config, the real guest image, a short run directory.

Unix socket paths are limited to 108 bytes, so VMs run under a short
/tmp/vmf-XXXX directory rather than pytest's long tmp_path.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmfactory.config import Config, load_config
from vmfactory.guest.image import GuestImage, ImageBuilder
from vmfactory.hypervisor.proc import processes_under


def qemu_pids_under(root: Path) -> list[int]:
    """QEMU processes whose command line mentions a path under ``root`` (leak detector)."""
    return [proc.info["pid"] for proc in processes_under(root)]


@pytest.fixture(scope="session")
def run_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="vmf-", dir="/tmp"))
    yield root
    leaked = qemu_pids_under(root)
    shutil.rmtree(root, ignore_errors=True)
    assert not leaked, f"QEMU processes left behind: {leaked}"


@pytest.fixture(scope="session")
def config(run_root: Path) -> Config:
    """The embedded default config, with TCG (KVM is unusable on these hosts) and a
    private run directory."""
    return load_config(overrides={
        "paths": {"run_dir": str(run_root), "template_dir": str(run_root / "templates")},
        "vm": {"accel": "tcg"}})


@pytest.fixture(scope="session")
def guest_image(config: Config) -> GuestImage:
    return ImageBuilder(config.paths.state_dir, quiet=True).ensure()
