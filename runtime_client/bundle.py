"""OCI runtime-spec bundles: load and validate ``config.json``, and pack the rootfs
into a read-only ext4 block image for the guest, without mounting anything.

Only the fields the sandbox uses are read (process, root, hostname); everything
else an OCI config carries (mounts, linux, hooks, ...) is ignored on purpose.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import posixpath
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from runtime_client.errors import BundleError

log = logging.getLogger(__name__)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_ID = 2**32 - 2  # 2**32 - 1 is (uid_t)-1, which the kernel treats as "no change"
MAX_HOSTNAME = 64  # HOST_NAME_MAX on Linux
MAX_SYMLINK_HOPS = 40  # the kernel's MAXSYMLINKS

# The file system builder; a module constant so tests can swap in a failing command.
MKFS = "mkfs.ext4"
IMAGE_LABEL = "ctr-root"
# Bump when the image recipe (mkfs options) changes, so stale cached images are not reused.
SIGNATURE_VERSION = b"ctr-root-ext4-v1\0"
STALE_TEMP_SECONDS = 3600

_BLOCK = 4096
_MIB = 1 << 20


@dataclass(frozen=True)
class User:
    """Who the container's process runs as."""

    uid: int = 0
    gid: int = 0
    additional_gids: tuple[int, ...] = ()


@dataclass(frozen=True)
class ProcessSpec:
    """The container's init process, as ``config.json`` describes it."""

    args: tuple[str, ...]
    env: tuple[str, ...] = (f"PATH={DEFAULT_PATH}",)
    cwd: str = "/"
    user: User = User()
    terminal: bool = False

    def with_args(self, args: Sequence[str]) -> ProcessSpec:
        """A copy running ``args`` instead (the CLI's ``-- CMD...``); they must be non-empty."""
        try:
            checked = _parse_args(args)
        except _Invalid as exc:
            raise BundleError(str(exc)) from None
        return replace(self, args=checked)

    def with_terminal(self, terminal: bool) -> ProcessSpec:
        """A copy with ``terminal`` set (the CLI's ``-t``)."""
        return replace(self, terminal=bool(terminal))


@dataclass(frozen=True)
class Bundle:
    """A loaded, validated OCI bundle."""

    path: Path
    rootfs: Path
    process: ProcessSpec
    hostname: str
    readonly_root: bool


class _Invalid(Exception):
    """A config.json problem; load_bundle adds which bundle it is in."""


# --------------------------------------------------------------------------- loading


def load_bundle(path: str | Path) -> Bundle:
    """Load and validate the bundle directory at ``path``.

    Raises BundleError naming the bundle and the problem.  ``process.args[0]`` is not
    looked up here: PATH lookups belong inside the container (see find_executable).
    """
    given = Path(path)
    if not given.exists():
        raise BundleError(f"bundle {given}: no such directory")
    if not given.is_dir():
        raise BundleError(f"bundle {given}: not a directory")
    bundle_dir = given.resolve()
    config = _read_config(given, bundle_dir / "config.json")
    try:
        _check_oci_version(config.get("ociVersion"))
        process = _parse_process(config.get("process"))
        hostname = _parse_hostname(config.get("hostname"))
        root_path, readonly = _parse_root(config.get("root"))
    except _Invalid as exc:
        raise BundleError(f"bundle {given}: config.json: {exc}") from None
    rootfs = _check_rootfs(given, bundle_dir / root_path)
    return Bundle(bundle_dir, rootfs, process, hostname, readonly)


def _read_config(given: Path, config_path: Path) -> dict[str, Any]:
    if not config_path.exists():
        raise BundleError(f"bundle {given}: config.json is missing")
    if not config_path.is_file():
        raise BundleError(f"bundle {given}: config.json is not a regular file")
    try:
        text = config_path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BundleError(f"bundle {given}: config.json is not valid UTF-8") from None
    except OSError as exc:
        raise BundleError(f"bundle {given}: config.json: {exc.strerror}") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BundleError(f"bundle {given}: config.json: invalid JSON at line {exc.lineno} "
                          f"column {exc.colno}: {exc.msg}") from None
    if not isinstance(config, dict):
        raise BundleError(f"bundle {given}: config.json: top level must be an object")
    return config


def _check_rootfs(given: Path, root: Path) -> Path:
    if not root.exists():
        raise BundleError(f"bundle {given}: rootfs directory missing: {root}")
    if not root.is_dir():
        raise BundleError(f"bundle {given}: root.path is not a directory: {root}")
    return root.resolve()


def _check_oci_version(value: object) -> None:
    # Any version string is accepted: the fields we read have been stable since 1.0.
    if value is not None and not isinstance(value, str):
        raise _Invalid("ociVersion must be a string")


def _parse_root(raw: object) -> tuple[str, bool]:
    if raw is None:
        return "rootfs", False
    if not isinstance(raw, dict):
        raise _Invalid("root must be an object")
    root_path = raw.get("path", "rootfs")
    if not isinstance(root_path, str) or not root_path or "\0" in root_path:
        raise _Invalid("root.path must be a non-empty string")
    return root_path, _opt_bool(raw.get("readonly"), "root.readonly")


def _parse_hostname(value: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _Invalid("hostname must be a string")
    if len(value) > MAX_HOSTNAME:
        raise _Invalid(f"hostname is longer than {MAX_HOSTNAME} characters")
    if "/" in value or "\0" in value:
        raise _Invalid("hostname must not contain '/' or NUL")
    return value


def _parse_process(raw: object) -> ProcessSpec:
    if raw is None:
        raise _Invalid("process is required")
    if not isinstance(raw, dict):
        raise _Invalid("process must be an object")
    cwd = raw.get("cwd", "/")
    if cwd is None:
        cwd = "/"
    if not isinstance(cwd, str) or "\0" in cwd:
        raise _Invalid("process.cwd must be a string without NUL bytes")
    if not cwd.startswith("/"):
        raise _Invalid(f"process.cwd must be an absolute path, not {cwd!r}")
    return ProcessSpec(args=_parse_args(raw.get("args"), "process.args"),
                       env=_parse_env(raw.get("env")), cwd=cwd,
                       user=_parse_user(raw.get("user")),
                       terminal=_opt_bool(raw.get("terminal"), "process.terminal"))


def _parse_args(raw: object, where: str = "process.args") -> tuple[str, ...]:
    # A bare str is a sequence of str too; reject it rather than exec its letters.
    if (isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence) or not raw
            or not all(isinstance(a, str) for a in raw)):
        raise _Invalid(f"{where} must be a non-empty list of strings")
    for i, arg in enumerate(raw):
        if "\0" in arg:
            raise _Invalid(f"{where}[{i}] contains a NUL byte")
    return tuple(raw)


def _parse_env(raw: object) -> tuple[str, ...]:
    if raw is None:
        raw = []
    if not isinstance(raw, list) or not all(isinstance(e, str) for e in raw):
        raise _Invalid("process.env must be a list of strings")
    for i, entry in enumerate(raw):
        if "\0" in entry:
            raise _Invalid(f"process.env[{i}] contains a NUL byte")
        key, sep, _ = entry.partition("=")
        if not sep or not key:
            raise _Invalid(f"process.env[{i}] is not KEY=VALUE: {entry!r}")
    env = tuple(raw)
    if not any(e.startswith("PATH=") for e in env):
        env += (f"PATH={DEFAULT_PATH}",)
    return env


def _parse_user(raw: object) -> User:
    if raw is None:
        return User()
    if not isinstance(raw, dict):
        raise _Invalid("process.user must be an object")
    extra = raw.get("additionalGids")
    if extra is None:
        extra = []
    if not isinstance(extra, list):
        raise _Invalid("process.user.additionalGids must be a list of integers")
    gids = tuple(_id(g, f"process.user.additionalGids[{i}]") for i, g in enumerate(extra))
    return User(uid=_id(raw.get("uid", 0), "process.user.uid"),
                gid=_id(raw.get("gid", 0), "process.user.gid"), additional_gids=gids)


def _id(value: object, where: str) -> int:
    # bool is an int subclass; true/false as a uid is a config bug, not 1/0.
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ID:
        raise _Invalid(f"{where} must be an integer in 0..{MAX_ID}")
    return value


def _opt_bool(value: object, where: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _Invalid(f"{where} must be true or false")
    return value


# --------------------------------------------------------------------------- executables


def find_executable(bundle: Bundle, args0: str | None = None) -> str | None:
    """Resolve ``args0`` (default ``process.args[0]``) inside the rootfs as execvp would.

    A name containing "/" is taken as is (relative to ``process.cwd``); otherwise each
    PATH entry of ``process.env`` is tried in order.  Symlinks are followed inside the
    rootfs only.  Returns the in-container path (e.g. "/bin/sh") of the first existing
    regular file with an execute bit, else None.
    """
    name = bundle.process.args[0] if args0 is None else args0
    if not name or "\0" in name:
        return None
    cwd = bundle.process.cwd
    if "/" in name:
        candidates = [posixpath.join(cwd, name)]
    else:
        # An empty PATH entry means the current directory, as in execvp.
        candidates = [posixpath.join(cwd, d or ".", name) for d in _search_path(bundle.process.env)]
    for candidate in candidates:
        host = resolve_in_root(bundle.rootfs, candidate)
        if host is not None and _is_executable_file(host):
            return posixpath.normpath(candidate)
    return None


def _search_path(env: Sequence[str]) -> list[str]:
    # getenv() returns the first match, so the first PATH= entry wins.
    for entry in env:
        if entry.startswith("PATH="):
            return entry[len("PATH="):].split(":")
    return DEFAULT_PATH.split(":")


def resolve_in_root(root: Path, path: str) -> Path | None:
    """The host path that in-container ``path`` names, following symlinks as if ``root``
    were "/" (absolute targets and ".." never leave it); None if a component is
    missing, not a directory, or there are more than MAX_SYMLINK_HOPS links."""
    pending = [p for p in path.split("/") if p not in ("", ".")]
    pending.reverse()  # a stack: the next component is at the end
    resolved: list[str] = []
    hops = 0
    while pending:
        name = pending.pop()
        if name == "..":
            if resolved:  # ".." at the root stays at the root
                resolved.pop()
            continue
        host = root.joinpath(*resolved, name)
        try:
            st = os.lstat(host)
        except OSError:
            return None
        if not stat.S_ISLNK(st.st_mode):
            resolved.append(name)
            continue
        hops += 1
        if hops > MAX_SYMLINK_HOPS:
            return None
        target = os.readlink(host)
        if target.startswith("/"):
            resolved = []
        pending.extend(reversed([p for p in target.split("/") if p not in ("", ".")]))
    return root.joinpath(*resolved)


def _is_executable_file(host: Path) -> bool:
    try:
        st = os.lstat(host)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and bool(st.st_mode & 0o111)


# --------------------------------------------------------------------------- images


@dataclass(frozen=True)
class _Scan:
    signature: str
    data_bytes: int  # file sizes rounded up to blocks, plus a block per inode
    inodes: int


def scan_tree(rootfs: Path) -> _Scan:
    """Hash the tree's metadata (not contents: stat is enough and cheap) in sorted order."""
    digest = hashlib.sha256(SIGNATURE_VERSION)
    data = inodes = 0
    for rel, st, target in _walk(rootfs):
        rdev = st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0
        meta = (f"{stat.S_IFMT(st.st_mode)}:{stat.S_IMODE(st.st_mode)}:{st.st_uid}:{st.st_gid}"
                f":{st.st_size}:{st.st_mtime_ns}:{rdev}")
        # NUL cannot appear in names or link targets, so the records are unambiguous.
        digest.update(os.fsencode(rel) + b"\0" + meta.encode() + b"\0"
                      + os.fsencode(target) + b"\0")
        inodes += 1
        data += _BLOCK
        if stat.S_ISREG(st.st_mode):
            data += -(-st.st_size // _BLOCK) * _BLOCK
    return _Scan(digest.hexdigest(), data, inodes)


def _walk(rootfs: Path) -> Iterator[tuple[str, os.stat_result, str]]:
    """(relative path, lstat, symlink target or "") for the root and everything below,
    depth first in name order; an explicit stack so deep trees cannot hit the
    recursion limit."""
    yield ".", os.lstat(rootfs), ""
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        with os.scandir(rootfs / rel_dir if rel_dir else rootfs) as it:
            entries = sorted(it, key=lambda e: e.name)
        subdirs = []
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            st = entry.stat(follow_symlinks=False)
            target = os.readlink(entry.path) if stat.S_ISLNK(st.st_mode) else ""
            yield rel, st, target
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(rel)
        stack.extend(reversed(subdirs))


def image_size_mib(data_bytes: int) -> int:
    """30% headroom over the estimate, plus slack for ext4 metadata; at least 16 MiB."""
    return max(16, -(-data_bytes * 13 // 10 // _MIB) + 8)


class ImageCache:
    """Read-only ext4 images of bundle root filesystems, cached by content signature under ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def image_for(self, rootfs: Path) -> Path:
        """Return the path of an ext4 image of ``rootfs``, building it unless cached.

        Concurrent callers (threads or processes) for the same tree build it once.  A
        tree modified while its image is being built may yield a stale image: the
        signature is taken before the build starts.
        """
        rootfs = Path(rootfs)
        if not rootfs.is_dir():
            raise BundleError(f"rootfs directory missing: {rootfs}")
        try:
            scan = scan_tree(rootfs)
        except OSError as exc:
            raise BundleError(f"cannot read rootfs {rootfs}: {exc}") from None
        self._ensure_directory()
        image = self.directory / f"{scan.signature[:24]}.ext4"
        with self._locked(image, blocking=True):
            if image.exists():
                os.utime(image)  # prune() evicts by mtime: mark it recently used
                return image
            self._build(rootfs, image, scan)
        return image

    def prune(self, keep: int = 16) -> int:
        """Remove least-recently-used images beyond ``keep``; return how many were removed.

        Images locked by a concurrent image_for() are skipped.  A path image_for()
        already returned may still be removed before its caller opens it; run prune
        when it cannot matter, or keep enough images.
        """
        if keep < 0:
            raise ValueError(f"keep must be >= 0, not {keep}")
        if not self.directory.is_dir():
            return 0
        self._remove_stale_temps()
        images = []
        for entry in os.scandir(self.directory):
            if entry.name.endswith(".ext4") and not entry.name.startswith("."):
                with contextlib.suppress(FileNotFoundError):
                    images.append((entry.stat(follow_symlinks=False).st_mtime_ns, entry.name))
        images.sort(reverse=True)
        return sum(self._evict(self.directory / name, mtime) for mtime, name in images[keep:])

    def _evict(self, image: Path, seen_mtime_ns: int) -> bool:
        with self._locked(image, blocking=False) as held:
            if not held:
                return False  # being built or reused right now
            try:
                if image.stat().st_mtime_ns != seen_mtime_ns:
                    return False  # reused since we listed it: no longer least recent
                image.unlink()
            except FileNotFoundError:
                return False
            # A waiter on this lock file re-checks for the image after it gets the
            # lock, so unlinking it while held at worst duplicates a build.
            self._lock_path(image).unlink(missing_ok=True)
        log.info("pruned image %s", image.name)
        return True

    def _remove_stale_temps(self) -> None:
        # Left by a builder that was killed; mkfs keeps writing a live one.
        cutoff = time.time() - STALE_TEMP_SECONDS
        for entry in os.scandir(self.directory):
            if entry.name.startswith(".build-"):
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.unlink(entry.path)

    def _ensure_directory(self) -> None:
        try:
            self.directory.mkdir(parents=True)
        except FileExistsError:
            if not self.directory.is_dir():
                raise BundleError(f"image cache {self.directory} is not a directory") from None
        else:
            # mkdir's mode is filtered by the umask; the cache should be private regardless.
            os.chmod(self.directory, 0o700)

    @staticmethod
    def _lock_path(image: Path) -> Path:
        return image.with_name(f".{image.stem}.lock")

    @contextlib.contextmanager
    def _locked(self, image: Path, *, blocking: bool) -> Iterator[bool]:
        """Hold the per-image flock; yields False if not blocking and someone else has it."""
        fd = os.open(self._lock_path(image), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # closing releases the flock

    def _build(self, rootfs: Path, image: Path, scan: _Scan) -> None:
        size_mib = image_size_mib(scan.data_bytes)
        start = time.monotonic()
        fd, tmp_name = tempfile.mkstemp(prefix=".build-", suffix=".ext4", dir=self.directory)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            run_mkfs(rootfs, tmp, size_mib, scan.inodes)
            # Read-only before it becomes visible under its final name.
            os.chmod(tmp, 0o444)
            os.rename(tmp, image)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        log.info("built image %s of %s: %d MiB in %d ms", image.name, rootfs, size_mib,
                 (time.monotonic() - start) * 1000)


def run_mkfs(rootfs: Path, target: Path, size_mib: int, inodes: int) -> None:
    """Write an ext4 file system holding a copy of ``rootfs`` into ``target``."""
    # mkfs.ext4 lives in sbin, which a non-root PATH often lacks.
    search = os.environ.get("PATH", os.defpath) + ":/usr/sbin:/sbin"
    binary = shutil.which(MKFS, path=search)
    if binary is None:
        raise BundleError(f"{MKFS} is not installed (apt-get install e2fsprogs)")
    # -N: the default bytes-per-inode ratio of large file systems runs out of inodes
    # on trees of many small files; ask for what the tree needs plus lost+found etc.
    argv = [binary, "-q", "-F", "-L", IMAGE_LABEL, "-O", "^has_journal",
            "-E", "root_owner=0:0", "-N", str(inodes * 5 // 4 + 256),
            "-d", str(rootfs), str(target), f"{size_mib}M"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, errors="replace",
                              check=False)
    except FileNotFoundError:
        raise BundleError(f"{MKFS} is not installed (apt-get install e2fsprogs)") from None
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        reason = lines[-1] if lines else f"exit status {proc.returncode}"
        raise BundleError(f"{MKFS} failed for {rootfs}: {reason}")
