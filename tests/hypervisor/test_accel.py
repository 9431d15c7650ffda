"""The accelerator choice: explicit values pass through, 'auto' runs a real probe."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from vmfactory.guest.image import GuestImage
from vmfactory.hypervisor import accel


@pytest.mark.parametrize("choice", ["kvm", "tcg"])
async def test_explicit_choice_is_not_probed(choice: str, tmp_path: Path) -> None:
    missing = tmp_path / "no-kernel"
    got = await accel.resolve_accel(choice, "qemu-system-x86_64", missing, missing, 1.0, tmp_path)
    assert got == choice
    assert not (tmp_path / "accel-probe.json").exists()


@pytest.mark.qemu
async def test_auto_probes_once_and_caches(guest_image: GuestImage, tmp_path: Path) -> None:
    start = time.monotonic()
    first = await accel.resolve_accel("auto", "qemu-system-x86_64", guest_image.kernel,
                                      guest_image.initrd, 20.0, tmp_path)
    probe_s = time.monotonic() - start
    assert first in ("kvm", "tcg")
    assert probe_s < 25.0  # bounded by the probe timeout, never a hang
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        cached = json.loads((tmp_path / "accel-probe.json").read_text())
        assert cached["kvm"] == (first == "kvm")
        # A cached verdict is reused: no second QEMU run.
        cached["kvm"] = not cached["kvm"]
        (tmp_path / "accel-probe.json").write_text(json.dumps(cached))
        again = await accel.resolve_accel("auto", "qemu-system-x86_64", guest_image.kernel,
                                          guest_image.initrd, 20.0, tmp_path)
        assert again != first


@pytest.mark.qemu
async def test_probe_under_tcg_sees_the_marker(guest_image: GuestImage) -> None:
    """The probe guest really prints its marker: proven under TCG, which works here."""
    seen = await accel.probe_guest("tcg", "qemu-system-x86_64", guest_image.kernel,
                                   guest_image.initrd, 30.0)
    assert seen is True
