"""``vmfactory-oci`` without a VM: what it answers for unknown ids, wrong input
and bad bundles (runc's exit code 1 and one line), what it prints for
``--version`` and ``features``, and that it imports only the standard library."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.oci.conftest import REPO, oci, one_line_failure, write_bundle_config

VERBS_ON_AN_ID = [["state"], ["start"], ["kill"], ["kill", "--all"], ["pause"], ["resume"],
                  ["ps"], ["exec"], ["delete"]]
GOOD_PROCESS = {"args": ["/bin/true"], "cwd": "/"}


@pytest.mark.parametrize("verb", VERBS_ON_AN_ID, ids=lambda v: "-".join(v))
def test_an_unknown_id_does_not_exist(tmp_path: Path, verb: list[str]) -> None:
    extra = ["--", "true"] if verb == ["exec"] else []
    line = one_line_failure(oci(tmp_path / "root", *verb, "nosuch", *extra))
    assert line == "container does not exist"


def test_delete_force_of_an_unknown_id_succeeds(tmp_path: Path) -> None:
    out = oci(tmp_path / "root", "delete", "--force", "nosuch")
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")


@pytest.mark.parametrize("bad", ["", "a/b", "../x", "x" * 200, "a b", "\u00e9t\u00e9"])
def test_ids_runc_would_refuse_are_refused(tmp_path: Path, bad: str) -> None:
    line = one_line_failure(oci(tmp_path / "root", "state", bad))
    assert "invalid container id" in line or "does not exist" not in line


def test_version_and_features(tmp_path: Path) -> None:
    out = oci(tmp_path, "--version")
    assert out.returncode == 0 and out.stderr == ""
    assert out.stdout.splitlines()[0].startswith("vmfactory-oci version ")
    assert out.stdout.splitlines()[1].startswith("spec: 1.")
    features = json.loads(oci(tmp_path, "features").stdout)
    assert features["ociVersionMin"] == "1.0.0" and "linux" in features


def test_list_of_an_empty_root(tmp_path: Path) -> None:
    out = oci(tmp_path / "root", "list", "--format", "json")
    assert out.returncode == 0 and json.loads(out.stdout) == []
    assert oci(tmp_path / "root", "list", "-q").stdout == ""


@pytest.mark.parametrize(("name", "spec", "expected"), [
    ("no-config", None, "no such file"),
    ("bad-json", "{not json", "not a valid JSON"),
    ("not-object", "[1, 2]", "not a JSON object"),
    ("no-root", {"process": GOOD_PROCESS}, "root.path is missing"),
    ("missing-root", {"process": GOOD_PROCESS, "root": {"path": "rootfs"}}, "does not exist"),
    ("no-args", {"process": {"args": []}, "root": {"path": "."}}, "process.args"),
    ("tty-without-socket", {"process": {**GOOD_PROCESS, "terminal": True},
                            "root": {"path": "."}}, "console socket"),
])
def test_bad_bundles_are_one_line_and_leave_nothing(tmp_path: Path, name: str,
                                                    spec: object, expected: str) -> None:
    bundle = tmp_path / name
    bundle.mkdir()
    if spec is not None:
        write_bundle_config(bundle, spec if isinstance(spec, (str, dict)) else json.dumps(spec))
    root = tmp_path / "root"
    pid_file = tmp_path / "pid"
    line = one_line_failure(oci(root, "create", "--bundle", str(bundle), "--pid-file",
                                str(pid_file), "c1"))
    assert expected in line, line
    assert not pid_file.exists()
    assert not (root / "c1").exists()
    assert one_line_failure(oci(root, "state", "c1")) == "container does not exist"


def test_errors_go_to_the_log_as_runc_writes_them(tmp_path: Path) -> None:
    log = tmp_path / "log.json"
    out = oci(tmp_path / "root", "--log", str(log), "--log-format", "json", "state", "x")
    assert out.returncode == 1
    entry = json.loads(log.read_text().splitlines()[-1])
    assert entry["level"] == "error" and entry["msg"] == "container does not exist"
    assert "time" in entry
    text_log = tmp_path / "log.txt"
    oci(tmp_path / "root", "--log", str(text_log), "start", "x")
    assert 'level=error msg="container does not exist"' in text_log.read_text()


def test_usage_errors_are_one_line(tmp_path: Path) -> None:
    one_line_failure(oci(tmp_path, "frobnicate"))
    one_line_failure(oci(tmp_path, "kill", "x", "SIGNOPE"))
    one_line_failure(oci(tmp_path, "create"))
    one_line_failure(oci(tmp_path))


def test_undecodable_arguments_are_one_line(tmp_path: Path) -> None:
    argv = [sys.executable.encode(), b"-m", b"runtime_client.oci.cli", b"state", b"x\xff"]
    out = subprocess.run(argv, capture_output=True, timeout=60, cwd=REPO)
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_the_command_imports_only_the_standard_library() -> None:
    probe = ("import sys, runtime_client.oci.cli\n"
             "print('\\n'.join(sorted(m for m in sys.modules if '.' not in m)))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60, cwd=REPO, check=True)
    modules = set(out.stdout.split())
    heavy = modules & {"vmfactory", "grpc", "google", "psutil", "pydantic", "yaml"}
    assert not heavy, heavy
    assert {"runtime_client"} <= modules
    stdlib = set(sys.stdlib_module_names) | {"runtime_client", "__main__", "_distutils_hack",
                                             "__editable___vmfactory_0_1_0_finder"}
    assert {m for m in modules if m.lstrip("_") not in stdlib and m not in stdlib} == set()


def test_sockets_deep_under_a_long_root_are_reachable(tmp_path: Path) -> None:
    # docker's root and 64-character ids make ROOT/ID/control.sock longer than a
    # unix socket address may be.
    import socket

    from runtime_client.oci.state import SUN_PATH_MAX, socket_path
    deep = tmp_path / ("r" * 60) / ("0123456789abcdef" * 4)
    deep.mkdir(parents=True)
    path = deep / "control.sock"
    assert len(str(path)) > SUN_PATH_MAX
    with socket.socket(socket.AF_UNIX) as listener, socket.socket(socket.AF_UNIX) as client:
        with socket_path(path) as address:
            listener.bind(address)
        listener.listen()
        assert path.is_socket()
        with socket_path(path) as address:
            client.connect(address)
        listener.accept()[0].close()
