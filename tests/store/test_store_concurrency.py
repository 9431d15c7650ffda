"""Several real processes against one store."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import vmfactory
from vmfactory.store import CorruptRecord, FilesystemStore, LevelDbStore, StoreLocked

REPO_ROOT = Path(vmfactory.__file__).resolve().parents[1]
ROUNDS = 200
SHARED_KEYS = 5

# Each worker opens the store, says "ready", waits for "go" on stdin, then
# hammers it: the same shared keys as the other worker, its own keys, and a
# save/delete churn in directories both workers use (which makes the empty-
# directory pruning race with the other worker's saves).
FS_WORKER = textwrap.dedent(
    """
    import sys
    from vmfactory.store import FilesystemStore, RecordNotFound

    root, name, rounds, shared = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    store = FilesystemStore(root)
    print("ready", flush=True)
    assert sys.stdin.readline().strip() == "go"
    for i in range(rounds):
        value = (f"{name}:{i}:".encode()) * 100
        store.save(f"shared/k{i % shared}", value)
        store.save(f"own/{name}/k{i}", value)
        if i % 4 == 0:
            churn = f"churn/d{i % 3}/{name}"
            store.save(churn, value)
            store.delete(churn)
    store.close()
    print("done", flush=True)
    """
)

LDB_OPENER = textwrap.dedent(
    """
    import sys
    from vmfactory.store import LevelDbStore, StoreLocked

    try:
        store = LevelDbStore(sys.argv[1])
    except StoreLocked as exc:
        print(f"LOCKED {exc}", flush=True)
        sys.exit(3)
    print(store.load("k").decode(), flush=True)
    store.close()
    """
)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def _expected_values(name: str) -> set[bytes]:
    return {(f"{name}:{i}:".encode()) * 100 for i in range(ROUNDS)}


def _run_fs_workers(root: Path, names: tuple[str, ...]) -> None:
    """Start one worker process per name, release them together, wait for all."""
    workers = {
        name: subprocess.Popen(
            [sys.executable, "-c", FS_WORKER, str(root), name, str(ROUNDS), str(SHARED_KEYS)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=_env(),
        )
        for name in names
    }
    try:
        for name, proc in workers.items():  # all have the store open before any writes
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready", f"{name} did not start"
        for proc in workers.values():
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for name, proc in workers.items():
            out, err = proc.communicate(timeout=100)
            assert proc.returncode == 0, f"{name} failed:\n{err}"
            assert out.strip() == "done"
    finally:
        for proc in workers.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


@pytest.mark.timeout(120)
def test_two_processes_hammering_one_filesystem_store(tmp_path: Path) -> None:
    root = tmp_path / "store"
    FilesystemStore(root).close()
    _run_fs_workers(root, ("p1", "p2"))
    every_value = _expected_values("p1") | _expected_values("p2")
    with FilesystemStore(root) as store:
        keys = store.list()
        assert store.list("shared/") == [f"shared/k{i}" for i in range(SHARED_KEYS)]
        assert store.list("churn") == []
        for name in ("p1", "p2"):
            assert store.list(f"own/{name}/") == sorted(f"own/{name}/k{i}" for i in range(ROUNDS))
        for key in keys:
            try:
                value = store.load(key)
            except CorruptRecord as exc:  # pragma: no cover - the failure we test for
                pytest.fail(f"{key} is corrupt: {exc}")
            assert value in every_value, key
        for i in range(ROUNDS):
            assert store.load(f"own/p1/k{i}") == (f"p1:{i}:".encode()) * 100
    assert not (root / "corrupt").exists()
    assert not list((root / "data").rglob("*.tmp"))
    assert not (root / "data" / "churn.d").exists()


def test_threads_sharing_one_filesystem_store(tmp_path: Path) -> None:
    errors: list[BaseException] = []
    with FilesystemStore(tmp_path / "s") as store:

        def work(name: str) -> None:
            try:
                for i in range(40):
                    store.save("same", f"{name}:{i}".encode())
                    store.save(f"dir/{name}", b"x")
                    store.delete(f"dir/{name}")
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(f"t{n}",)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert store.load("same").decode().split(":")[0] in {"t0", "t1", "t2", "t3"}
        assert store.list() == ["same"]


@pytest.mark.timeout(60)
def test_leveldb_second_process_gets_store_locked(tmp_path: Path) -> None:
    path = tmp_path / "meta.ldb"
    store = LevelDbStore(path)
    store.save("k", b"from-first")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", LDB_OPENER, str(path)],
            capture_output=True, text=True, env=_env(), timeout=50,
        )
        assert proc.returncode == 3, proc.stderr
        assert proc.stdout.startswith("LOCKED ")
        assert str(path) in proc.stdout
        assert store.load("k") == b"from-first"  # the holder is unaffected
    finally:
        store.close()
    proc = subprocess.run(
        [sys.executable, "-c", LDB_OPENER, str(path)],
        capture_output=True, text=True, env=_env(), timeout=50,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "from-first"


def test_leveldb_second_handle_in_same_process_gets_store_locked(tmp_path: Path) -> None:
    path = tmp_path / "meta.ldb"
    with LevelDbStore(path):
        with pytest.raises(StoreLocked) as info:
            LevelDbStore(path)
        assert info.value.path == str(path)
        assert str(path) in str(info.value)
    with LevelDbStore(path) as again:
        assert again.list() == []
