"""``vmfactory-oci`` driven as an engine drives runc, against a real daemon with a
warm pool of real QEMU VMs: create/start/state/kill/delete, exec, pause/resume,
the answers for the wrong state, and nothing left afterwards (no lease, no
resident, no state directory)."""

from __future__ import annotations

import json
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.oci.conftest import REPO, oci, oci_argv, one_line_failure, write_bundle_config
from tests.runtime.conftest import RuntimeDaemon

pytestmark = pytest.mark.qemu

WAIT_S = 240


@dataclass
class Oci:
    rd: RuntimeDaemon
    root: Path
    work: Path

    def __call__(self, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return oci(self.root, *args, config=self.rd.config, **kw)  # type: ignore[arg-type]

    def bundle(self, rootfs: Path, args: list[str], name: str) -> Path:
        bundle = self.work / f"bundle-{name}"
        write_bundle_config(bundle, {
            "ociVersion": "1.0.2", "root": {"path": str(rootfs)},  # absolute, as podman's
            "process": {"args": args, "env": ["PATH=/bin"], "cwd": "/",
                        "user": {"uid": 0, "gid": 0}},
            "annotations": {"org.example.test": name}})
        return bundle

    def create(self, bundle: Path, cid: str) -> Engine:
        d = self.work / f"engine-{cid}"
        d.mkdir()
        argv = oci_argv(self.root, "create", "--bundle", str(bundle), "--pid-file",
                        str(d / "pid"), cid, config=self.rd.config)
        proc = subprocess.Popen([sys.executable, str(REPO / "tests/oci/engine.py"), str(d),
                                 "--", *argv], cwd=REPO)
        engine = Engine(d, proc)
        engine.wait_for("create.json")
        return engine

    def state(self, cid: str) -> dict[str, object]:
        out = self("state", cid)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)  # type: ignore[no-any-return]


@dataclass
class Engine:
    dir: Path
    proc: subprocess.Popen[bytes]

    def wait_for(self, name: str) -> str:
        deadline = time.monotonic() + WAIT_S
        while not (self.dir / name).exists():
            assert time.monotonic() < deadline, f"no {name}: {self.output('stderr')}"
            time.sleep(0.05)
        time.sleep(0.05)  # written whole by now
        return (self.dir / name).read_text()

    @property
    def create_rc(self) -> int:
        return int(json.loads(self.wait_for("create.json"))["rc"])

    @property
    def pid(self) -> int:
        return int((self.dir / "pid").read_text())

    def exit_code(self) -> int:
        return int(self.wait_for("exit"))

    def output(self, name: str) -> str:
        path = self.dir / name
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture
def engine_env(runtime_daemon: RuntimeDaemon, busybox_bundle: Path) -> Iterator[Oci]:
    work = Path(tempfile.mkdtemp(prefix="vmfo-", dir="/tmp"))
    env = Oci(runtime_daemon, work / "root", work)
    try:
        yield env
        for name in env.root.iterdir() if env.root.exists() else []:
            env("delete", "--force", name.name)
        residents = [p for p in psutil.process_iter(["cmdline"])
                     if "runtime_client.oci.resident" in (p.info["cmdline"] or [])
                     and str(env.root) in " ".join(p.info["cmdline"] or [])]
        assert not residents, "residents left"
        assert not env.root.exists() or not list(env.root.iterdir())
        deadline = time.monotonic() + 30
        while runtime_daemon.leases():
            assert time.monotonic() < deadline, f"leases left: {runtime_daemon.leases()}"
            time.sleep(0.2)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_create_start_state_wait_delete(engine_env: Oci, busybox_bundle: Path) -> None:
    env = engine_env
    bundle = env.bundle(busybox_bundle / "rootfs",
                        ["sh", "-c", "echo out; echo err >&2; sleep 3; exit 3"], "life")
    engine = env.create(bundle, "life")
    assert engine.create_rc == 0, engine.output("stderr")
    state = env.state("life")
    assert state["status"] == "created" and state["pid"] == engine.pid
    assert state["bundle"] == str(bundle) and state["id"] == "life"
    assert state["annotations"] == {"org.example.test": "life"}
    assert psutil.pid_exists(engine.pid)
    assert env("start", "life").returncode == 0
    assert env.state("life")["status"] == "running"
    assert one_line_failure(env("start", "life")) == \
        "cannot start an already running container"
    assert one_line_failure(env("delete", "life")) == \
        "cannot delete container life that is not stopped: running"
    assert engine.exit_code() == 3
    assert engine.output("stdout") == "out\n" and engine.output("stderr") == "err\n"
    assert env.state("life")["status"] == "stopped"
    assert one_line_failure(env("start", "life")) == "cannot start a container that has stopped"
    assert one_line_failure(env("kill", "life", "KILL")) == "container not running"
    assert env("delete", "life").returncode == 0
    assert one_line_failure(env("state", "life")) == "container does not exist"


def test_exec_pause_resume_kill(engine_env: Oci, busybox_bundle: Path) -> None:
    env = engine_env
    engine = env.create(env.bundle(busybox_bundle / "rootfs", ["sleep", "600"], "busy"), "busy")
    assert engine.create_rc == 0, engine.output("stderr")
    assert env("start", "busy").returncode == 0
    out = env("exec", "busy", "--", "sh", "-c", "echo hi; echo there >&2; exit 5")
    assert (out.returncode, out.stdout, out.stderr) == (5, "hi\n", "there\n")
    process = env.work / "process.json"
    process.write_text(json.dumps({"args": ["sh", "-c", "echo $GREETING from $(pwd)"],
                                   "env": ["PATH=/bin", "GREETING=hello"], "cwd": "/tmp"}))
    out = env("exec", "--process", str(process), "busy")
    assert (out.returncode, out.stdout) == (0, "hello from /tmp\n"), out.stderr
    assert env("pause", "busy").returncode == 0
    assert env.state("busy")["status"] == "paused"
    assert one_line_failure(env("pause", "busy")) == "container not running"
    assert env("resume", "busy").returncode == 0
    assert env.state("busy")["status"] == "running"
    listed = json.loads(env("list", "--format", "json").stdout)
    assert [(c["id"], c["status"]) for c in listed] == [("busy", "running")]
    assert env("kill", "busy", "KILL").returncode == 0
    assert engine.exit_code() == 137
    assert env("delete", "busy").returncode == 0


def test_delete_force_of_a_running_container_gives_the_vm_back(engine_env: Oci,
                                                               busybox_bundle: Path) -> None:
    env = engine_env
    engine = env.create(env.bundle(busybox_bundle / "rootfs", ["sleep", "600"], "f"), "f")
    assert engine.create_rc == 0 and env("start", "f").returncode == 0
    assert len(env.rd.leases()) == 1
    assert env("delete", "--force", "f").returncode == 0
    assert not psutil.pid_exists(engine.pid) or \
        psutil.Process(engine.pid).status() == psutil.STATUS_ZOMBIE
    assert engine.exit_code() == 137
    assert env.rd.leases() == []


def test_a_missing_program_fails_create_before_any_vm(engine_env: Oci,
                                                      busybox_bundle: Path) -> None:
    env = engine_env
    before = env.rd.handouts()
    engine = env.create(env.bundle(busybox_bundle / "rootfs", ["/no/such/program"], "m"), "m")
    assert engine.create_rc == 1
    lines = engine.output("stderr").strip().splitlines()
    assert len(lines) == 1 and "not found" in lines[0], lines
    assert env.rd.handouts() == before
    assert one_line_failure(env("state", "m")) == "container does not exist"


def _hooked_bundle(env: Oci, rootfs: Path, name: str, fail_prestart: bool = False) -> Path:
    bundle = env.bundle(rootfs, ["sleep", "2"], name)  # still running for poststart
    config = json.loads((bundle / "config.json").read_text())
    log = env.work / f"hooks-{name}"

    def hook(kind: str) -> dict[str, object]:
        script = f"read -r state; echo \"{kind} $state\" >> {log}"
        if fail_prestart and kind == "prestart":
            script += "; echo refused >&2; exit 3"
        return {"path": "/bin/sh", "args": ["sh", "-c", script], "timeout": 30}
    config["hooks"] = {k: [hook(k)] for k in ("prestart", "createRuntime", "poststart",
                                              "poststop")}
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


def test_hooks_run_on_the_host_with_the_state_on_stdin(engine_env: Oci,
                                                       busybox_bundle: Path) -> None:
    env = engine_env
    engine = env.create(_hooked_bundle(env, busybox_bundle / "rootfs", "h"), "h")
    assert engine.create_rc == 0, engine.output("stderr")
    assert env("start", "h").returncode == 0
    assert engine.exit_code() == 0
    assert env("delete", "h").returncode == 0
    calls = [line.split(" ", 1) for line in (env.work / "hooks-h").read_text().splitlines()]
    assert [k for k, _ in calls] == ["prestart", "createRuntime", "poststart", "poststop"]
    states = [json.loads(s) for _, s in calls]
    assert all(s["id"] == "h" and s["pid"] in (engine.pid, 0) for s in states)
    assert [s["status"] for s in states] == ["created", "created", "running", "stopped"]


def test_a_failing_prestart_hook_fails_create_and_leaves_nothing(engine_env: Oci,
                                                                 busybox_bundle: Path) -> None:
    env = engine_env
    engine = env.create(_hooked_bundle(env, busybox_bundle / "rootfs", "hf", True), "hf")
    assert engine.create_rc == 1
    lines = engine.output("stderr").strip().splitlines()
    assert len(lines) == 1 and "prestart hook /bin/sh exited 3: refused" in lines[0], lines
    assert one_line_failure(env("state", "hf")) == "container does not exist"
    deadline = time.monotonic() + 30
    while env.rd.leases():
        assert time.monotonic() < deadline, "the failed create kept its lease"
        time.sleep(0.2)


def test_create_on_a_cold_image_cache_prints_nothing(engine_env: Oci,
                                                     busybox_bundle: Path) -> None:
    env = engine_env
    rootfs = env.work / "fresh-rootfs"
    shutil.copytree(busybox_bundle / "rootfs", rootfs, symlinks=True)
    (rootfs / "marker").write_text(str(time.time_ns()))  # a tree no image was built of
    engine = env.create(env.bundle(rootfs, ["true"], "cold"), "cold")
    assert engine.create_rc == 0, engine.output("stderr")
    assert env("start", "cold").returncode == 0
    assert engine.exit_code() == 0
    assert (engine.output("stdout"), engine.output("stderr")) == ("", "")
    assert env("delete", "cold").returncode == 0


def test_a_writable_directory_bind_fails_create_before_any_vm(engine_env: Oci,
                                                              busybox_bundle: Path) -> None:
    env = engine_env
    bundle = env.bundle(busybox_bundle / "rootfs", ["true"], "wd")
    (env.work / "vol").mkdir()
    config = json.loads((bundle / "config.json").read_text())
    config["mounts"] = [{"destination": "/vol", "type": "bind", "source": str(env.work / "vol"),
                         "options": ["rbind"]}]
    (bundle / "config.json").write_text(json.dumps(config))
    before = env.rd.handouts()
    engine = env.create(bundle, "wd")
    assert engine.create_rc == 1
    lines = engine.output("stderr").strip().splitlines()
    assert len(lines) == 1 and "mounts[0]" in lines[0] and "writable" in lines[0], lines
    assert env.rd.handouts() == before
    assert one_line_failure(env("state", "wd")) == "container does not exist"


def test_delete_after_the_resident_was_killed_gives_the_vm_back_now(
        engine_env: Oci, busybox_bundle: Path) -> None:
    env = engine_env
    engine = env.create(env.bundle(busybox_bundle / "rootfs", ["sleep", "600"], "k9"), "k9")
    assert engine.create_rc == 0 and env("start", "k9").returncode == 0
    assert len(env.rd.leases()) == 1
    os.kill(engine.pid, signal.SIGKILL)  # no chance to give anything back
    assert engine.exit_code() == 137
    assert env.state("k9")["status"] == "stopped"
    assert env("delete", "k9").returncode == 0
    assert env.rd.leases() == []  # now, not at the lease's TTL (30 s)
    records = env.rd.root / "client"
    left = [p.name for p in records.rglob("*") if "k9" in p.name] if records.exists() else []
    assert not left, left
