"""Helpers for ``vmfactory-oci`` tests: the command run as an engine runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

# The real daemon (pool "small") and the busybox bundle of the runtime client's tests.
from tests.runtime.conftest import busybox_bundle, runtime_daemon  # noqa: E402,F401

REPO = Path(__file__).resolve().parents[2]


def oci_argv(root: Path, *args: str, config: Path | None = None) -> list[str]:
    head = [sys.executable, "-m", "runtime_client.oci.cli"]
    if config is not None:
        head += ["--config", str(config)]
    return [*head, "--root", str(root), *args]


def oci(root: Path, *args: str, config: Path | None = None, timeout: float = 120,
        **kw: Any) -> subprocess.CompletedProcess[str]:
    kw.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run(oci_argv(root, *args, config=config), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, **kw)


def one_line_failure(out: subprocess.CompletedProcess[str]) -> str:
    """runc's way to fail: exit 1 and one line on stderr, nothing on stdout."""
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stdout == ""
    return lines[0]


def write_bundle_config(bundle: Path, spec: dict[str, Any] | str) -> None:
    bundle.mkdir(parents=True, exist_ok=True)
    text = spec if isinstance(spec, str) else json.dumps(spec)
    (bundle / "config.json").write_text(text)
