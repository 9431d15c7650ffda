"""One typed configuration, loaded from TOML and validated once.

``load_config()`` merges a user file over the embedded default
(``config/vmfactory.toml``).  Every value is checked here, so the rest of the
code can trust it; a bad value raises :class:`ConfigError` naming its key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vmfactory.errors import ConfigError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "vmfactory.toml"

Accel = Literal["auto", "kvm", "tcg"]

NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,31}$")
MIN_MEMORY_MIB = 128
MAX_CPUS = 64
MAX_MEMORY_MIB = 1 << 20


def _check_range(key: str, value: float, lo: float, hi: float) -> None:
    if math.isnan(value) or not lo <= value <= hi:
        raise ConfigError(key, f"{value!r} is out of range [{lo}, {hi}]")


@dataclass(frozen=True)
class PathsConfig:
    state_dir: Path = Path("/var/lib/vmfactory")
    run_dir: Path = Path("/run/vmfactory")
    template_dir: Path = Path("/dev/shm/vmfactory-templates")

    @property
    def vms_dir(self) -> Path:
        """Where each VM's run directory lives (recovery reaps what no record names)."""
        return self.run_dir / "vms"


@dataclass(frozen=True)
class ImageConfig:
    """Explicit kernel/initrd/rootfs paths; empty means the built image."""

    kernel: str = ""
    initrd: str = ""
    rootfs: str = ""


@dataclass(frozen=True)
class VmConfig:
    """What a VM is made of (Kata's HypervisorConfig)."""

    cpus: int = 1
    memory_mib: int = 256
    max_cpus: int = 4
    max_memory_mib: int = 2048
    accel: Accel = "auto"
    qemu: str = "qemu-system-x86_64"
    kernel_args: str = ""

    def __post_init__(self) -> None:
        _check_range("vm.cpus", self.cpus, 1, MAX_CPUS)
        _check_range("vm.max_cpus", self.max_cpus, self.cpus, MAX_CPUS)
        _check_range("vm.memory_mib", self.memory_mib, MIN_MEMORY_MIB, MAX_MEMORY_MIB)
        _check_range("vm.max_memory_mib", self.max_memory_mib, self.memory_mib, MAX_MEMORY_MIB)


@dataclass(frozen=True)
class TimeoutsConfig:
    """Seconds allowed for each named wait."""

    qemu_start: float = 10.0
    qmp_command: float = 10.0
    agent_ready: float = 90.0
    agent_call: float = 10.0
    shutdown: float = 10.0
    kvm_probe: float = 20.0
    migrate: float = 30.0
    hotplug: float = 10.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_range(f"timeouts.{f.name}", getattr(self, f.name), 0.01, 3600.0)


@dataclass(frozen=True)
class TemplateConfig:
    """Template naming and rotation (clones share the template's ASLR/KASLR
    layout; rebuilding bounds how long one layout lives)."""

    name: str = "default"
    max_age_s: float = 3600.0   # 0: no age limit
    max_clones: int = 1000      # 0: no clone limit
    # Clone QEMUs started ahead, waiting for a template's state (0: none).
    standby: int = 1

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError("template.name", f"{self.name!r}: use letters, digits, - and _")
        _check_range("template.max_age_s", self.max_age_s, 0, 365 * 86400)
        _check_range("template.max_clones", self.max_clones, 0, 10**9)
        _check_range("template.standby", self.standby, 0, 8)


Base = Literal["template", "direct"]
EmptyPolicy = Literal["wait", "fallback"]
Sizing = Literal["fixed", "adaptive"]


@dataclass(frozen=True)
class PoolConfig:
    """One warm pool: VMs of one size from one base, paused until handed out."""

    name: str = "default"
    cpus: int = 1
    memory_mib: int = 256
    base: Base = "template"
    min_size: int = 2
    max_size: int = 4
    # Keep pooled VMs running (no resume at handout; costs idle CPU).
    keep_running: bool = False
    # An empty pool makes the caller wait (up to its deadline) or boots/clones directly.
    empty: EmptyPolicy = "wait"
    # Run one throwaway container in each VM before it is pooled (see factory/warmup.py).
    warm_containers: bool = True
    # "": shared; else a unix group: only its members (and root) use this pool, and its
    # clones come from a template of the tenant's own (no memory shared with others).
    tenant: str = ""
    # fixed: keep min_size ready; adaptive: a target between min_size and max_size
    # from the request rate and the refill time (see daemon/sizing.py).
    sizing: Sizing = "fixed"

    def __post_init__(self) -> None:
        if self.tenant and not NAME_RE.match(self.tenant):
            raise ConfigError(f"pools.{self.name}.tenant",
                              f"{self.tenant!r}: a group name of letters, digits, '-' and '_'")
        _check_range(f"pools.{self.name}.min_size", self.min_size, 0, 1000)
        _check_range(f"pools.{self.name}.max_size", self.max_size, max(1, self.min_size), 1000)
        _check_range(f"pools.{self.name}.cpus", self.cpus, 1, MAX_CPUS)
        _check_range(f"pools.{self.name}.memory_mib", self.memory_mib, MIN_MEMORY_MIB,
                     MAX_MEMORY_MIB)


@dataclass(frozen=True)
class DaemonConfig:
    """The factory daemon (``vmfactory init``)."""

    socket: Path = Path("/run/vmfactory/factory.sock")
    socket_mode: str = "0600"
    socket_group: str = ""
    # Optional loopback TCP listener, e.g. "127.0.0.1:7788"; "" for none.  It needs
    # tcp_token_file: a root-owned file (mode 0600) whose token callers present.
    tcp: str = ""
    tcp_token_file: str = ""
    grace_s: float = 10.0
    refill_concurrency: int = 2
    # A VM being made for a pool (clone, warm-up) runs at this nice value, so it
    # yields the CPUs to handouts and to the VMs in use; 0 at handout.
    refill_nice: int = 19
    # A refill waits until no VM was handed out for this long (a burst is served
    # first), unless the pool holds fewer than refill_low_water ready VMs.
    refill_quiet_s: float = 0.2
    refill_low_water: int = 1
    # Refills pause while the host's available memory is under this.
    mem_floor_mib: int = 1024
    # How often pooled VMs are checked for a dead QEMU.
    health_interval_s: float = 1.0
    # Where AttachDisk may take images from; empty: the runtime client's image cache
    # (paths.state_dir/bundle-images).
    disk_roots: tuple[str, ...] = ()
    # A lease asked for without a TTL gets this one (root's: none); no caller but
    # root may ask for longer than max_lease_ttl_s.
    default_lease_ttl_s: float = 300.0
    max_lease_ttl_s: float = 86400.0
    # Connections served at once on the socket.
    max_connections: int = 256

    def __post_init__(self) -> None:
        try:
            mode = int(self.socket_mode, 8)
        except ValueError:
            raise ConfigError("daemon.socket_mode", f"{self.socket_mode!r} is not octal") from None
        _check_range("daemon.socket_mode", mode, 0o600, 0o666)
        host, _, port = self.tcp.rpartition(":")
        if self.tcp and (host not in ("127.0.0.1", "localhost", "[::1]") or not port.isdigit()):
            raise ConfigError("daemon.tcp", f"{self.tcp!r}: only a loopback HOST:PORT is allowed")
        _check_range("daemon.grace_s", self.grace_s, 0, 600)
        _check_range("daemon.refill_concurrency", self.refill_concurrency, 1, 64)
        _check_range("daemon.refill_nice", self.refill_nice, 0, 19)
        _check_range("daemon.refill_quiet_s", self.refill_quiet_s, 0, 60)
        _check_range("daemon.refill_low_water", self.refill_low_water, 0, 1000)
        _check_range("daemon.mem_floor_mib", self.mem_floor_mib, 0, MAX_MEMORY_MIB)
        _check_range("daemon.health_interval_s", self.health_interval_s, 0.05, 3600)
        if self.tcp and not self.tcp_token_file:
            raise ConfigError("daemon.tcp", "a TCP listener needs daemon.tcp_token_file")
        for i, root in enumerate(self.disk_roots):
            if not root.startswith("/") or "\0" in root:
                raise ConfigError(f"daemon.disk_roots[{i}]", f"{root!r} is not an absolute path")
        _check_range("daemon.default_lease_ttl_s", self.default_lease_ttl_s, 1, 10**7)
        _check_range("daemon.max_lease_ttl_s", self.max_lease_ttl_s, self.default_lease_ttl_s,
                     10**7)
        _check_range("daemon.max_connections", self.max_connections, 1, 100000)


@dataclass(frozen=True)
class AdminConfig:
    """The admin HTTP API, metrics and status page (FastAPI in the daemon)."""

    enabled: bool = True
    socket: Path = Path("/run/vmfactory/admin.sock")  # mode 0600: root's
    # Optional loopback listener, e.g. "127.0.0.1:7789": reading (the status page,
    # /metrics) is open to local users; changing anything needs tcp_token_file's token.
    tcp: str = ""
    tcp_token_file: str = ""

    def __post_init__(self) -> None:
        host, _, port = self.tcp.rpartition(":")
        if self.tcp and (host not in ("127.0.0.1", "localhost", "[::1]") or not port.isdigit()):
            raise ConfigError("admin.tcp", f"{self.tcp!r}: only a loopback HOST:PORT is allowed")


@dataclass(frozen=True)
class StoreConfig:
    """Where records that must survive a crash live (file:///... or leveldb:///...)."""

    url: str = "leveldb:///var/lib/vmfactory/store.ldb"


ShimMode = Literal["noopshim", "katashim", "katashimbuiltin", "ccshim"]
ProxyMode = Literal["noProxy", "kataProxy", "kataProxyBuiltin", "noopProxy", "ccProxy"]
Fallback = Literal["createnew", "fail"]
# Kata's deprecated names, accepted and mapped (with a warning where they are used).
SHIM_ALIASES = {"ccshim": "katashim"}
PROXY_ALIASES = {"ccProxy": "kataProxy"}


@dataclass(frozen=True)
class RuntimeConfig:
    """The runtime client (``vmfactory-runtime``): modes, records, fallback."""

    shim: ShimMode = "katashimbuiltin"
    proxy: ProxyMode = "noProxy"
    # No daemon answering: boot a VM in the client process (createnew) or fail.
    fallback: Fallback = "createnew"
    # Sandbox and container records (file:// lets several client processes share them).
    store: str = "file:///var/lib/vmfactory/sandboxes"
    # How long GetVM may wait for the daemon's pool.
    get_vm_timeout_s: float = 60.0
    # Read-only root images of bundles kept in the cache.
    image_cache_keep: int = 16
    # Where the root images are made ("": paths.state_dir/bundle-images, the daemon's
    # default disk root); each uid gets its own directory in it.
    image_dir: str = ""
    # Sandbox directories (proxy sockets ...); "": paths.run_dir/sandboxes.
    run_dir: str = ""
    # The TTL of the client's leases, renewed every third of it while the sandbox is held.
    lease_ttl_s: float = 30.0

    def __post_init__(self) -> None:
        _check_range("runtime.get_vm_timeout_s", self.get_vm_timeout_s, 0.1, 3600)
        _check_range("runtime.lease_ttl_s", self.lease_ttl_s, 1, 86400)
        for key in ("image_dir", "run_dir"):
            value = getattr(self, key)
            if value and not value.startswith("/"):
                raise ConfigError(f"runtime.{key}", f"{value!r} is not an absolute path")
        _check_range("runtime.image_cache_keep", self.image_cache_keep, 1, 10000)
        if not self.store.startswith(("file://", "leveldb://")):
            raise ConfigError("runtime.store", f"{self.store!r}: use file:///path or leveldb:///path")


@dataclass(frozen=True)
class Config:
    """The whole vmfactory configuration."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    vm: VmConfig = field(default_factory=VmConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    template: TemplateConfig = field(default_factory=TemplateConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    pools: tuple[PoolConfig, ...] = (PoolConfig(),)

    def __post_init__(self) -> None:
        names = [p.name for p in self.pools]
        if len(set(names)) != len(names):
            raise ConfigError("pools", f"pool names must be unique, got {names}")
        for p in self.pools:
            if p.cpus > self.vm.max_cpus or p.memory_mib > self.vm.max_memory_mib:
                raise ConfigError(f"pools.{p.name}", "larger than vm.max_cpus/max_memory_mib")


def _convert(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            choices = ", ".join(map(repr, typing.get_args(hint)))
            raise ConfigError(key, f"{value!r} is not one of {choices}")
        return value
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(key, "expected a non-empty path string")
        return Path(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or isinstance(value, bool) != (hint is bool):
        raise ConfigError(key, f"expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and bad types."""
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip(".") or "<root>", "expected a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(prefix + unknown[0], "unknown key")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build(hint, value, f"{prefix}{name}.")
        elif typing.get_origin(hint) is tuple:
            item = typing.get_args(hint)[0]
            if not isinstance(value, list):
                raise ConfigError(prefix + name, "expected an array")
            if dataclasses.is_dataclass(item):
                kwargs[name] = tuple(build(item, v, f"{prefix}{name}[{i}].")
                                     for i, v in enumerate(value))
            else:
                kwargs[name] = tuple(_convert(f"{prefix}{name}[{i}]", v, item)
                                     for i, v in enumerate(value))
        else:
            kwargs[name] = _convert(prefix + name, value, hint)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(prefix.rstrip(".") or "<root>", str(exc)) from exc


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as exc:
        raise ConfigError(str(path), "file not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"invalid TOML: {exc}") from exc


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load the default config, a user file over it, then ``overrides`` over that."""
    data = _read_toml(DEFAULT_CONFIG)
    if path is not None:
        data = _merge(data, _read_toml(path))
    if overrides:
        data = _merge(data, overrides)
    return build(Config, data)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string: quotes, backslashes, \uXXXX


def to_toml(config: Config) -> str:
    """The effective configuration as TOML (what the Config RPC returns)."""
    lines: list[str] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        tables = value if isinstance(value, tuple) else (value,)
        for table in tables:
            lines.append(f"[[{f.name}]]" if isinstance(value, tuple) else f"[{f.name}]")
            for sub in dataclasses.fields(table):
                lines.append(f"{sub.name} = {_toml_value(getattr(table, sub.name))}")
            lines.append("")
    return "\n".join(lines)


def scratch_config(root: Path, overrides: dict[str, Any] | None = None,
                   name: str = "vmfactory.toml") -> Path:
    """Write a complete, validated config to ``root / name`` whose run directory,
    templates, daemon socket and record stores all live under ``root``, with
    ``overrides`` merged over that: a daemon that needs no system paths (tests,
    benchmarks).  Raises ConfigError like :func:`load_config`."""
    under_root = {
        "paths": {"run_dir": str(root / "run"), "template_dir": str(root / "templates")},
        "daemon": {"socket": str(root / "factory.sock")},
        "admin": {"socket": str(root / "admin.sock")},
        "store": {"url": f"file://{root / 'store'}"},
        "runtime": {"store": f"file://{root / 'client'}"},
    }
    config = load_config(overrides=_merge(under_root, overrides or {}))
    path = root / name
    path.write_text(to_toml(config))
    return path
