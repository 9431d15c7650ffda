"""Debian packages as image inputs: resolve, download (cached) and unpack.

Packages are fetched with ``apt-get download`` and unpacked with ``dpkg-deb``;
nothing is installed on the host.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmfactory.errors import ImageError

KERNEL_METAPACKAGE = "linux-image-amd64"
APT_LISTS = "/var/lib/apt/lists"


@dataclass(frozen=True)
class DebRef:
    """One resolved package: what apt would download, and its published hash."""

    package: str
    filename: str
    size: int
    sha256: str


def _run(argv: list[str], what: str, cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise ImageError(f"{what}: {argv[0]} is not installed") from exc
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ImageError(f"{what}: {last}")
    return proc.stdout


def resolve_kernel_package(meta: str = KERNEL_METAPACKAGE) -> str:
    """The versioned kernel package a metapackage like linux-image-amd64 points to."""
    out = _run(["apt-cache", "depends", meta], f"resolve {meta} (run apt-get update?)")
    for line in out.splitlines():
        kind, _, target = line.strip().partition(": ")
        if kind == "Depends" and target.startswith("linux-image-"):
            return target
    raise ImageError(f"resolve {meta}: no linux-image dependency (run apt-get update?)")


def resolve(packages: list[str]) -> list[DebRef]:
    """Ask apt which file each package would be, without downloading it."""
    out = _run(["apt-get", "download", "--print-uris", *packages],
               f"resolve packages {' '.join(packages)} (run apt-get update?)")
    by_name: dict[str, DebRef] = {}
    for line in out.splitlines():
        _uri, filename, size, digest = line.split()
        package = filename.split("_", 1)[0]
        algo, _, value = digest.partition(":")
        if algo != "SHA256":
            raise ImageError(f"resolve {package}: apt gave no SHA256 for {filename}")
        by_name[package] = DebRef(package, filename, int(size), value)
    missing = [p for p in packages if p not in by_name]
    if missing:
        raise ImageError(f"resolve packages: apt has no {', '.join(missing)}")
    return [by_name[p] for p in packages]


def resolve_cached(packages: list[str], cache_file: Path) -> list[DebRef]:
    """:func:`resolve`, with the kernel metapackage (first) followed, remembered
    until apt's package lists change (apt's own look-ups take seconds here)."""
    try:
        stamp = f"{os.stat(APT_LISTS).st_mtime_ns}:{','.join(packages)}"
    except OSError:
        stamp = ""
    try:
        cached = json.loads(cache_file.read_text())
        if stamp and cached["stamp"] == stamp:
            return [DebRef(**ref) for ref in cached["refs"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    names = [resolve_kernel_package(packages[0]), *packages[1:]]
    refs = resolve(names)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_text(json.dumps({"stamp": stamp, "refs": [r.__dict__ for r in refs]}))
    return refs


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(ref: DebRef, cache_dir: Path) -> Path:
    """Return the cached .deb for ``ref``, downloading and verifying it if needed."""
    path = cache_dir / ref.filename
    if path.exists() and path.stat().st_size == ref.size:
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    _run(["apt-get", "download", ref.package], f"download {ref.package}", cwd=cache_dir)
    if not path.exists():
        raise ImageError(f"download {ref.package}: apt did not produce {ref.filename}")
    if _sha256(path) != ref.sha256:
        path.unlink()
        raise ImageError(f"download {ref.package}: {ref.filename} does not match its SHA256")
    return path


def extract(deb: Path, dest: Path, keep: Callable[[str], bool] | None = None) -> list[str]:
    """Unpack ``deb`` into ``dest``; with ``keep``, only members it accepts.

    Returns the member names written.
    """
    dest.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    written = []
    assert proc.stdout is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                if keep is None or keep(member.name):
                    tar.extract(member, dest, filter="fully_trusted")
                    written.append(member.name)
    except tarfile.TarError as exc:
        raise ImageError(f"unpack {deb.name}: {exc}") from exc
    finally:
        proc.stdout.close()
        err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
        if proc.wait() != 0:
            raise ImageError(f"unpack {deb.name}: {err or 'dpkg-deb failed'}")
    return written
