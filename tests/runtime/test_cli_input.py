"""The runtime CLI against hostile input: undecodable arguments, generated
config.json files.  Whatever comes in, it exits with a code and, when the code is
its own (125, 126, 127, 2), one line on stderr; never a traceback, and nothing
left behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime_client.bundles.busybox import make_busybox_bundle
from tests.runtime.conftest import REPO, RuntimeDaemon, cli_argv, list_json

pytestmark = pytest.mark.qemu

OWN_CODES = {2, 125, 126, 127}


@pytest.fixture
def rd(runtime_daemon: RuntimeDaemon) -> RuntimeDaemon:
    return runtime_daemon


@pytest.fixture(scope="module")
def bundle() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="vmfr-in-", dir="/tmp"))
    try:
        yield make_busybox_bundle(base / "bundle")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run_bytes(config: Path, args: list[bytes]) -> subprocess.CompletedProcess[bytes]:
    argv = [os.fsencode(a) for a in cli_argv(config)] + args
    return subprocess.run(argv, capture_output=True, timeout=120, cwd=REPO,
                          stdin=subprocess.DEVNULL)


def assert_own_failure(out: subprocess.CompletedProcess[bytes], code: int = 125) -> str:
    assert out.returncode == code, out.stderr
    lines = out.stderr.decode(errors="replace").strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


@pytest.mark.parametrize("args", [
    [b"run", b"--name", b"x\xff", b"BUNDLE"],
    [b"run", b"BUNDLE", b"--", b"echo", b"\xc3\x28"],
    [b"\xfe\xfe"],
])
def test_undecodable_arguments_are_one_line_and_125(rd: RuntimeDaemon, bundle: Path,
                                                    args: list[bytes]) -> None:
    args = [os.fsencode(str(bundle)) if a == b"BUNDLE" else a for a in args]
    line = assert_own_failure(run_bytes(rd.config, args))
    assert "not valid UTF-8" in line


def test_a_lone_surrogate_in_config_json_is_one_line_and_125(rd: RuntimeDaemon,
                                                             tmp_path: Path) -> None:
    target = make_busybox_bundle(tmp_path / "b")
    config = json.loads((target / "config.json").read_text())
    config["process"]["args"] = ["echo", "\ud800"]
    (target / "config.json").write_text(json.dumps(config))  # ensure_ascii: "\ud800" escaped
    line = assert_own_failure(run_bytes(rd.config, [b"run", b"--rm", os.fsencode(str(target))]))
    assert "process.args[1] is not valid Unicode" in line


JSON = st.recursive(st.none() | st.booleans() | st.integers(-(1 << 40), 1 << 40)
                    | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
PROCESS = st.fixed_dictionaries({}, optional={
    "args": st.one_of(JSON, st.lists(st.sampled_from(["echo", "true", "false", "/bin/sh", "nope",
                                                      "", "\ud800", "a\0b"]), max_size=3)),
    "env": JSON, "cwd": st.one_of(JSON, st.sampled_from(["/", "/tmp", "rel", "/nope"])),
    "user": JSON, "terminal": JSON})
CONFIG = st.fixed_dictionaries({}, optional={
    "ociVersion": JSON, "process": st.one_of(PROCESS, JSON), "root": JSON, "hostname": JSON})


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(config=CONFIG)
def test_generated_config_json_never_crashes_the_cli(rd: RuntimeDaemon, bundle: Path,
                                                     config: dict[str, Any]) -> None:
    (bundle / "config.json").write_text(json.dumps(config))
    out = run_bytes(rd.config, [b"run", b"--rm", os.fsencode(str(bundle))])
    assert 0 <= out.returncode <= 255
    assert b"Traceback" not in out.stderr, out.stderr
    if out.returncode in OWN_CODES and out.stderr.startswith(b"vmfactory-runtime:"):
        # The CLI's own failure (not the program's exit code): one line.
        assert len(out.stderr.decode(errors="replace").strip().splitlines()) == 1, out.stderr


def test_afterwards_nothing_is_left(rd: RuntimeDaemon) -> None:
    assert list_json(rd.config)["sandboxes"] == []
    assert rd.leases() == []
