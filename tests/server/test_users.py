"""A second caller as another uid, in the daemon's socket group, against a real
daemon with real QEMU VMs: it is confined to its own leases and to the files it
may read, and its own lease works end to end.

The user and its group are made for the module and removed after it.  Its
processes run Debian's /usr/bin/python3 on this checkout's packages (the venv's
interpreter lives under /root, which other users may not enter).
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from runtime_client.bundles.busybox import make_busybox_bundle
from tests.server.conftest import (
    POOL_READY_TIMEOUT_S, DaemonProc, assert_clean, start_daemon, stop_daemon,
)
from vmfactory.config import scratch_config
from vmfactory.guest.image import GuestImage
from vmfactory.server.client import FactoryClient

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parents[2]
USER_PYTHON = "/usr/bin/python3"
IMAGES = Path("/var/lib/vmfactory/bundle-images")
# Runs as the user: each line of stdin is a call, each line of stdout its outcome.
CALLS = r"""
import asyncio, json, sys
from pathlib import Path
from vmfactory.server.client import FactoryClient

async def main() -> None:
    async with FactoryClient(sys.argv[1], timeout=60) as client:
        for line in sys.stdin:
            name, *args = json.loads(line)
            try:
                if name == "attach":
                    result = await client.attach_disk(args[0], Path(args[1]), args[2])
                elif name == "status":
                    result = [[v.lease_id, v.owner_uid, v.vm_id] for v in (await client.status()).vms]
                elif name == "get":
                    h = await client.get_vm(lease_ttl_s=120)
                    result = [h.lease_id, h.agent_socket, h.pid]
                else:
                    result = await getattr(client, name)(*args)
                out = ["OK", result]
            except Exception as exc:
                out = [type(exc).__name__, str(exc)]
            print(json.dumps(out, default=str), flush=True)

asyncio.run(main())
"""


@dataclass
class User:
    name: str
    uid: int
    gid: int
    home: Path

    def env(self) -> dict[str, str]:
        site = sysconfig.get_paths()["purelib"]
        return {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": str(self.home),
                "PYTHONPATH": f"{REPO}:{site}", "LANG": "C.UTF-8"}

    def run(self, *argv: str, input: str = "", timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), input=input, capture_output=True, text=True,
                              timeout=timeout, user=self.uid, group=self.gid,
                              extra_groups=[self.gid], env=self.env(), cwd=self.home)

    def calls(self, socket: Path, *calls: list[object]) -> list[list[object]]:
        """Run ``calls`` as this user through one FactoryClient; their outcomes."""
        out = self.run(USER_PYTHON, "-c", CALLS, str(socket),
                       input="".join(json.dumps(c) + "\n" for c in calls))
        assert out.returncode == 0, out.stderr
        return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.fixture(scope="module")
def user() -> Iterator[User]:
    if not os.access(USER_PYTHON, os.X_OK):
        pytest.skip(f"{USER_PYTHON} is missing (./dev setup installs it)")
    name = "vmft" + secrets.token_hex(3)
    home = Path(tempfile.mkdtemp(prefix="vmfu-home-", dir="/tmp"))
    subprocess.run(["groupadd", name], check=True)
    subprocess.run(["useradd", "-M", "-N", "-g", name, "-d", str(home), "-s", "/usr/sbin/nologin",
                    name], check=True)
    info = pwd.getpwnam(name)
    os.chown(home, info.pw_uid, info.pw_gid)
    try:
        yield User(name, info.pw_uid, info.pw_gid, home)
    finally:
        subprocess.run(["pkill", "-KILL", "-u", name], check=False)
        time.sleep(0.2)
        subprocess.run(["userdel", name], check=False)
        subprocess.run(["groupdel", name], check=False)
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(IMAGES / str(info.pw_uid), ignore_errors=True)


@pytest.fixture(scope="module")
def daemon(user: User, guest_image: GuestImage) -> Iterator[DaemonProc]:
    root = Path(tempfile.mkdtemp(prefix="vmfu-", dir="/tmp"))
    os.chmod(root, 0o711)  # the user reaches the socket and its VM's agent socket
    user_dir = root / "user"
    user_dir.mkdir()
    os.chown(user_dir, user.uid, user.gid)
    config = scratch_config(root, {
        "vm": {"accel": "tcg"},
        "daemon": {"socket_group": user.name, "socket_mode": "0660", "health_interval_s": 0.2},
        "runtime": {"store": f"file://{user_dir / 'client'}", "run_dir": str(user_dir / "run"),
                    "fallback": "fail", "get_vm_timeout_s": 300.0},
        "pools": [{"name": "small", "min_size": 2, "max_size": 3}]})
    os.chmod(config, 0o644)
    d = start_daemon(root, config)
    try:
        yield d
    finally:
        code = stop_daemon(d)
        try:
            assert code == 0, d.log()
            assert_clean(root)
        finally:
            subprocess.run(["umount", "-l", *map(str, (root / "templates").glob("*"))],
                           capture_output=True, check=False)
            shutil.rmtree(root, ignore_errors=True)


async def ready(d: DaemonProc) -> None:
    async with FactoryClient(d.socket) as client:
        deadline = time.monotonic() + POOL_READY_TIMEOUT_S
        while (await client.status()).pools[0].ready < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.3)


def test_another_uid_cannot_touch_roots_lease(daemon: DaemonProc, user: User) -> None:
    asyncio.run(ready(daemon))

    async def take() -> tuple[str, str, str]:
        async with FactoryClient(daemon.socket) as client:
            h = await client.get_vm()
            return h.lease_id, h.vm_id, h.agent_socket
    lease, vm_id, agent = asyncio.run(take())
    try:
        out = user.calls(daemon.socket, ["release", lease], ["renew", lease, 60],
                         ["attach", lease, "/etc/hostname", "x1"], ["detach_disk", lease, "x1"],
                         ["status"], ["quit"])
        assert [o[0] for o in out[:4]] == ["PermissionDenied"] * 4, out
        seen = {vm: (lid, owner) for lid, owner, vm in out[4][1]}
        assert seen[vm_id] == ("", 0)  # listed, owned by root, without its lease id
        assert out[5][0] == "PermissionDenied" and "root" in out[5][1]
        probe = user.run(USER_PYTHON, "-c", "import socket,sys; s=socket.socket(socket.AF_UNIX);"
                         " s.connect(sys.argv[1])", agent)
        assert "Permission denied" in probe.stderr  # root's VM's guest is not the user's
    finally:
        async def release() -> None:
            async with FactoryClient(daemon.socket) as client:
                await client.release(lease)
        asyncio.run(release())


def qemu_fd_targets(stop: threading.Event, seen: set[str]) -> None:
    """Every file any QEMU process holds, polled until ``stop``."""
    while not stop.is_set():
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            try:
                if b"qemu-system" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                    continue
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    seen.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue
        time.sleep(0.005)


def test_the_user_plugs_in_only_files_it_may_read(daemon: DaemonProc, user: User,
                                                  tmp_path: Path) -> None:
    asyncio.run(ready(daemon))
    mine = IMAGES / str(user.uid)
    setup = user.run("/bin/sh", "-c", f"umask 077; mkdir -p {mine} && truncate -s 1M "
                     f"{mine}/img.ext4 && ln -sf /etc/shadow {mine}/shadow.ext4 && "
                     f"mkfifo {mine}/fifo")
    assert setup.returncode == 0, setup.stderr
    os.mknod(mine / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    stranger = IMAGES / "stranger.ext4"
    stranger.write_bytes(b"\0" * 4096)
    os.chown(stranger, 4343, 4343)
    got = user.calls(daemon.socket, ["get"])[0]
    assert got[0] == "OK", got
    lease = got[1][0]
    try:
        out = user.calls(daemon.socket, ["attach", lease, "/etc/shadow", "a1"],
                         ["attach", lease, f"{mine}/shadow.ext4", "a2"],
                         ["attach", lease, str(stranger), "a3"],
                         ["attach", lease, str(mine), "a4"],
                         ["attach", lease, f"{mine}/fifo", "a5"],
                         ["attach", lease, f"{mine}/null", "a6"],
                         ["attach", lease, f"{mine}/img.ext4", "a7"])
        assert [o[0] for o in out] == ["PermissionDenied"] * 3 + ["InvalidRequest"] * 3 + ["OK"]
        assert user.calls(daemon.socket, ["detach_disk", lease, "a7"])[0][0] == "OK"
        flipped = swap_race(daemon, user, lease, mine)
        assert flipped["OK"] and flipped["PermissionDenied"]  # both sides of the race
    finally:
        user.calls(daemon.socket, ["release", lease])
        stranger.unlink()


def swap_race(daemon: DaemonProc, user: User, lease: str, mine: Path) -> dict[str, int]:
    """The user flips a path between its image and a symlink to /etc/shadow while it
    attaches (and detaches) it: QEMU never holds /etc/shadow."""
    flip = (f"while true; do ln -f {mine}/img.ext4 {mine}/.t && mv -f {mine}/.t {mine}/flip.ext4;"
            f" ln -sf /etc/shadow {mine}/.s && mv -f {mine}/.s {mine}/flip.ext4; done")
    flipper = subprocess.Popen(["/bin/sh", "-c", flip], user=user.uid, group=user.gid)
    stop, seen = threading.Event(), set()
    watcher = threading.Thread(target=qemu_fd_targets, args=(stop, seen))
    watcher.start()
    counts = {"OK": 0, "PermissionDenied": 0, "NotFound": 0}
    try:
        calls: list[list[object]] = []
        for i in range(30):
            calls += [["attach", lease, f"{mine}/flip.ext4", f"r{i}"], ["detach_disk", lease, f"r{i}"]]
        for attach, _ in zip(*[iter(user.calls(daemon.socket, *calls))] * 2):
            counts[attach[0]] = counts.get(attach[0], 0) + 1
    finally:
        flipper.kill()
        flipper.wait()
        stop.set()
        watcher.join()
    assert "/etc/shadow" not in seen
    assert f"{mine}/img.ext4" in seen or any("flip" in s for s in seen)
    return counts


def test_the_users_own_lease_works_end_to_end(daemon: DaemonProc, user: User) -> None:
    asyncio.run(ready(daemon))
    bundle = make_busybox_bundle(user.home / "bundle", ("sh", "-c", "echo hello from $(id -u)"))
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(user.home / "bundle")],
                   check=True)
    out = user.run(USER_PYTHON, "-m", "runtime_client", "--config", str(daemon.config), "run",
                   "--rm", str(bundle))
    assert out.returncode == 0, out.stderr
    assert out.stdout == "hello from 0\n"  # root in the container, the user's VM
    out = user.calls(daemon.socket, ["status"])[0]
    assert out[0] == "OK" and not [v for v in out[1] if v[1] == user.uid]  # released
