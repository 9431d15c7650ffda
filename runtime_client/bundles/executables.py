"""Finding a bundle's program inside its root, as execvp would in the container."""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Sequence
from pathlib import Path

from runtime_client.bundles.loading import DEFAULT_PATH, Bundle

MAX_SYMLINK_HOPS = 40  # the kernel's MAXSYMLINKS



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
