"""Loading an OCI runtime-spec bundle: read and validate ``config.json``.

Read here: process, root, hostname; the confining parts (mounts, limits,
capabilities, paths, sysctls, resources) in ``confine``.  Hooks run on the host
and are the OCI command's (``runtime_client.oci.hooks``); seccomp, namespaces
and cgroupsPath are not needed in a VM (see ``confine``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from runtime_client.bundles.confine import (
    Confinement, ProcessLimits, parse_confinement, parse_process_limits,
)
from runtime_client.bundles.fields import Invalid as _Invalid
from runtime_client.bundles.fields import opt_bool as _opt_bool
from runtime_client.bundles.fields import text as _text
from runtime_client.errors import BundleError
from vmfactory.errors import quote

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_ID = 2**32 - 2  # 2**32 - 1 is (uid_t)-1, which the kernel treats as "no change"
MAX_HOSTNAME = 64  # HOST_NAME_MAX on Linux


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
    limits: ProcessLimits = ProcessLimits()

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
    confinement: Confinement = Confinement()
    annotations: dict[str, str] = field(default_factory=dict)  # for the runtime's state


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
        confinement = parse_confinement(config)
    except _Invalid as exc:
        raise BundleError(f"bundle {given}: config.json: {exc}") from None
    rootfs = _check_rootfs(given, bundle_dir / root_path)
    return Bundle(bundle_dir, rootfs, process, hostname, readonly, confinement,
                  _annotations(config.get("annotations")))


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
    _text(root_path, "root.path")
    return root_path, _opt_bool(raw.get("readonly"), "root.readonly")


def _annotations(raw: object) -> dict[str, str]:
    """As ``state`` shows them; not ours to judge, so only bounded."""
    if not isinstance(raw, dict):
        return {}
    return {str(k)[:256]: str(v)[:4096] for k, v in raw.items()}


def _parse_hostname(value: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _Invalid("hostname must be a string")
    if len(value) > MAX_HOSTNAME:
        raise _Invalid(f"hostname is longer than {MAX_HOSTNAME} characters")
    if "/" in value or "\0" in value:
        raise _Invalid("hostname must not contain '/' or NUL")
    _text(value, "hostname")
    return value


def parse_process(raw: object) -> ProcessSpec:
    """An OCI ``process`` object (an exec's ``--process`` file), validated as a
    bundle's is; BundleError naming the field."""
    try:
        return _parse_process(raw)
    except _Invalid as exc:
        raise BundleError(f"process: {exc}") from None


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
    _text(cwd, "process.cwd")
    if not cwd.startswith("/"):
        raise _Invalid(f"process.cwd must be an absolute path, not {quote(cwd)}")
    return ProcessSpec(args=_parse_args(raw.get("args"), "process.args"),
                       env=_parse_env(raw.get("env")), cwd=cwd,
                       user=_parse_user(raw.get("user")),
                       terminal=_opt_bool(raw.get("terminal"), "process.terminal"),
                       limits=parse_process_limits(raw))


def _parse_args(raw: object, where: str = "process.args") -> tuple[str, ...]:
    # A bare str is a sequence of str too; reject it rather than exec its letters.
    if (isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence) or not raw
            or not all(isinstance(a, str) for a in raw)):
        raise _Invalid(f"{where} must be a non-empty list of strings")
    for i, arg in enumerate(raw):
        _text(arg, f"{where}[{i}]")
    return tuple(raw)


def _parse_env(raw: object) -> tuple[str, ...]:
    if raw is None:
        raw = []
    if not isinstance(raw, list) or not all(isinstance(e, str) for e in raw):
        raise _Invalid("process.env must be a list of strings")
    for i, entry in enumerate(raw):
        _text(entry, f"process.env[{i}]")
        key, sep, _ = entry.partition("=")
        if not sep or not key:
            raise _Invalid(f"process.env[{i}] is not KEY=VALUE: {quote(entry)}")
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
