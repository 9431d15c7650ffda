"""The loopback TCP listener: it needs a token file of root's (mode 0600), and a
call without the token is refused."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.conftest import assert_clean, start_daemon, stop_daemon
from vmfactory.config import scratch_config
from vmfactory.errors import PermissionDenied
from vmfactory.server.client import FactoryClient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vmft-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def tcp_config(root: Path, token_file: Path, port: int) -> Path:
    # No pool to fill: only the listener matters here.
    return scratch_config(root, {
        "daemon": {"tcp": f"127.0.0.1:{port}", "tcp_token_file": str(token_file)},
        "pools": [{"name": "none", "min_size": 0, "max_size": 1}]})


async def test_a_token_opens_the_tcp_listener_and_nothing_else_does(root: Path) -> None:
    token = secrets.token_hex(24)
    token_file = root / "token"
    token_file.write_text(token + "\n")
    os.chmod(token_file, 0o600)
    port = free_port()
    d = start_daemon(root, tcp_config(root, token_file, port))
    try:
        async with FactoryClient(tcp=f"127.0.0.1:{port}", token=token) as client:
            assert (await client.status()).pools[0].name == "none"
        for wrong in ("", "x" * 48):
            async with FactoryClient(tcp=f"127.0.0.1:{port}", token=wrong) as client:
                with pytest.raises(PermissionDenied, match="token"):
                    await client.status()
    finally:
        assert stop_daemon(d) == 0, d.log()
    assert_clean(root)


@pytest.mark.parametrize("mode, content, problem", [
    (0o644, "t" * 40, "mode 0600"),
    (0o600, "short", "at least 32"),
])
def test_a_token_file_others_may_read_or_too_short_is_refused(
        root: Path, mode: int, content: str, problem: str) -> None:
    token_file = root / "token"
    token_file.write_text(content)
    os.chmod(token_file, mode)
    out = subprocess.run([sys.executable, "-m", "vmfactory.cli", "--config",
                          str(tcp_config(root, token_file, free_port())), "init"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("vmfactory: error: daemon.tcp_token_file")
    assert problem in out.stderr
    assert not (root / "factory.sock").exists()


def test_tcp_without_a_token_file_is_a_config_error(root: Path) -> None:
    from vmfactory.config import load_config
    from vmfactory.errors import ConfigError
    with pytest.raises(ConfigError, match="tcp_token_file"):
        load_config(overrides={"daemon": {"tcp": "127.0.0.1:7788"}})
