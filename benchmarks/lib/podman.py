"""podman with vmfactory-oci as one of its runtimes, in a scratch directory: the
containers.conf a user writes (plus this machine's two settings), a busybox image
imported from a rootfs, and a cleanup that leaves no container, image or mount.
Shared by tests/oci/test_podman.py and benchmarks/engines.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
IMAGE = "localhost/vmf-busybox:test"
RUN_TIMEOUT_S = 300.0
IMPORT_TIMEOUT_S = 120.0


def containers_conf(wrapper: Path) -> str:
    """What the README tells a user to write (plus this machine's two settings)."""
    return f"""[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
netns = "none"

[engine]
runtime = "vmfactory"
runtime_supports_json = ["crun", "runc", "kata", "vmfactory"]

[engine.runtimes]
vmfactory = ["{wrapper}"]
"""


def traced_script(command: str, trace: Path) -> str:
    """A shell wrapper running ``command "$@"`` that appends "start_ns end_ns rc
    argv..." to ``trace`` for each call (the same cost for every runtime)."""
    return (f"#!/bin/sh\ns=$(date +%s%N)\n{command} \"$@\"\nrc=$?\n"
            f"echo \"$s $(date +%s%N) $rc $*\" >> {trace}\nexit $rc\n")


def wrapper_script(config: Path, trace: Path | None = None) -> str:
    """This checkout's vmfactory-oci (the installed one is .venv/bin/vmfactory-oci);
    with ``trace``, traced as traced_script does."""
    env, run = f"PYTHONPATH={REPO}", f"{sys.executable} -m runtime_client.oci.cli --config {config}"
    if trace is None:
        return f"#!/bin/sh\n{env} exec {run} \"$@\"\n"
    return traced_script(f"{env} {run}", trace)


class Podman:
    """``podman`` on its own storage (vfs, under ``work``), vmfactory-oci as default."""

    def __init__(self, config: Path, trace: Path | None = None) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="vmfp-", dir="/tmp"))
        self.wrapper = self.work / "vmfactory-oci"
        self.wrapper.write_text(wrapper_script(config, trace))
        self.wrapper.chmod(0o755)
        (self.work / "containers.conf").write_text(containers_conf(self.wrapper))
        self.env = {**os.environ, "CONTAINERS_CONF": str(self.work / "containers.conf")}

    def argv(self, *args: str) -> list[str]:
        return ["podman", "--root", str(self.work / "storage"), "--runroot",
                str(self.work / "run"), "--storage-driver", "vfs", "--cgroup-manager",
                "cgroupfs", "--events-backend", "none", *args]

    def __call__(self, *args: str, input: bytes | None = None,
                 timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(self.argv(*args), env=self.env, input=input,
                              capture_output=True, timeout=timeout,
                              stdin=None if input is not None else subprocess.DEVNULL)

    def import_rootfs(self, rootfs: Path, image: str = IMAGE) -> None:
        tar = subprocess.run(["tar", "-C", str(rootfs), "-c", "."], capture_output=True,
                             check=True).stdout
        out = self("import", "-", image, input=tar, timeout=IMPORT_TIMEOUT_S)
        if out.returncode != 0:
            raise RuntimeError(f"podman import: {out.stderr.decode(errors='replace')[-500:]}")

    def containers(self) -> list[str]:
        return [c.decode() for c in self("ps", "-aq").stdout.split()]

    def close(self) -> list[str]:
        """Remove every container and image and the scratch directory; the ids of
        the containers that were still there."""
        left = self.containers()
        for cid in left:
            self("rm", "-f", cid)
        self("rmi", "-af")
        subprocess.run(["umount", "-R", str(self.work / "storage")], capture_output=True)
        shutil.rmtree(self.work, ignore_errors=True)
        return left
