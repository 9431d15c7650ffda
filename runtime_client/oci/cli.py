"""``vmfactory-oci``: a runc-compatible command line; each container in a factory VM.

    vmfactory-oci [--root DIR] [--log FILE] [--log-format text|json] [--systemd-cgroup]
                  COMMAND [OPTIONS] ID

create, start, state, kill, delete, exec, pause, resume, ps, list, features;
``--version``.  Exit codes as runc: 0, or 1 with one line on stderr (and, with
``--log``, the same as a log entry in runc's format).  ``exec`` without
``--detach`` exits with the process's code.  Standard library only: engines
call this several times per container.

Where the sandboxes' config comes from: ``--config FILE``, else
``$VMFACTORY_CONFIG``, else /etc/vmfactory/vmfactory.toml if it exists, else the
embedded default (the daemon's socket at its default path).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
# typing and dataclasses cost ~20 ms of import, a third of this command's budget:
# annotations are strings here, so typing is only needed by the type checker.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn

from runtime_client.oci import execs, hooks
from runtime_client.oci.frontend import (
    Refused, await_report, check_bundle, open_console, resident_argv, spawn_reporting,
    write_pid_file,
)
from runtime_client.oci.state import (
    DEFAULT_ROOT, OCI_VERSION, ContainerDir, OciError, check_id, process_start_time,
    public_state,
)
from runtime_client.signames import signal_number

PROG = "vmfactory-oci"
VERSION = "0.1.0"
SYSTEM_CONFIG = Path("/etc/vmfactory/vmfactory.toml")
DELETE_WAIT_S = 30.0
FORGET_WAIT_S = 120.0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise OciError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__.splitlines()[0], add_help=True)
    p.add_argument("--version", "-v", action="store_true")
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    p.add_argument("--log", default="")
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    for flag in ("--systemd-cgroup", "--debug", "--no-pivot-root"):
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)  # accepted
    p.add_argument("--rootless", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--criu", default="", help=argparse.SUPPRESS)
    p.add_argument("--config", default=None, help="vmfactory config (TOML)")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    c = sub.add_parser("create")
    c.add_argument("--bundle", "-b", type=Path, default=Path("."))
    c.add_argument("--pid-file", default="")
    c.add_argument("--console-socket", default="")
    c.add_argument("--no-pivot", action="store_true")
    c.add_argument("--no-new-keyring", action="store_true")
    c.add_argument("--preserve-fds", type=int, default=0)
    c.add_argument("id")
    for verb in ("start", "state", "pause", "resume"):
        sub.add_parser(verb).add_argument("id")
    k = sub.add_parser("kill")
    k.add_argument("--all", "-a", action="store_true")
    k.add_argument("id")
    k.add_argument("signal", nargs="?", default="SIGTERM")
    d = sub.add_parser("delete")
    d.add_argument("--force", "-f", action="store_true")
    d.add_argument("id")
    ps = sub.add_parser("ps")
    ps.add_argument("--format", "-f", choices=("table", "json"), default="table")
    ps.add_argument("id")
    ps.add_argument("ps_args", nargs=argparse.REMAINDER)
    ls = sub.add_parser("list")
    ls.add_argument("--format", "-f", choices=("table", "json"), default="table")
    ls.add_argument("--quiet", "-q", action="store_true")
    sub.add_parser("features")
    execs.add_parser(sub)
    return p


def parse_signal(value: str) -> int:
    try:
        return signal_number(value)
    except ValueError as exc:
        raise OciError(str(exc)) from None


def config_path(args: argparse.Namespace) -> str | None:
    if args.config:
        return str(Path(args.config).absolute())
    env = os.environ.get("VMFACTORY_CONFIG")
    if env:
        return str(Path(env).absolute())
    return str(SYSTEM_CONFIG) if SYSTEM_CONFIG.exists() else None


# --- the verbs ----------------------------------------------------------------------------

def cmd_create(args: argparse.Namespace) -> int:
    cdir = ContainerDir(args.root, check_id(args.id))
    bundle = args.bundle.absolute()
    spec = check_bundle(bundle)
    terminal = bool(spec["process"].get("terminal"))
    if terminal and not args.console_socket:
        raise OciError("cannot allocate tty if runc will detach without setting console socket")
    if args.console_socket and not terminal:
        raise OciError("cannot use console socket if runc will not detach or allocate tty")
    bundle_hooks = hooks.parse(spec)
    cdir.claim()
    pid = 0
    try:
        hooks.save(cdir, bundle_hooks)
        slave = open_console(args.console_socket) if terminal else None
        pid, ready = spawn_reporting(
            resident_argv(cdir, config_path(args), "--bundle", str(bundle)), slave)
        await_report(pid, ready, f"container {cdir.id}", cdir.log)
        hooks.run(bundle_hooks, ("prestart", "createRuntime"), public_state(cdir.load()))
        if args.pid_file:
            write_pid_file(args.pid_file, pid)
    except BaseException as exc:
        if pid and not isinstance(exc, Refused):
            _undo_create(cdir, pid, args)
        _remove_dir(cdir)
        raise
    return 0


def _undo_create(cdir: ContainerDir, pid: int, args: argparse.Namespace) -> None:
    """A create that failed after its resident was forked: it gives the VM back,
    or, dead or deaf, is killed and a helper does."""
    started = process_start_time(pid)  # before it may exit
    try:
        cdir.request("delete")
        _wait_gone({"pid": pid, "pid_start": started})
        return
    except OciError:
        pass
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _forget(cdir, args)


def cmd_start(args: argparse.Namespace) -> int:
    cdir = ContainerDir(args.root, check_id(args.id))
    status = cdir.load()["status"]
    if status == "stopped":
        raise OciError("cannot start a container that has stopped")
    if status in ("running", "paused"):
        raise OciError("cannot start an already running container")
    if status != "created":
        raise OciError(f"cannot start a container in the {status} state")
    cdir.request("start")
    hooks.warn(hooks.load(cdir), ("poststart",), public_state(cdir.load()))
    return 0


def cmd_state(args: argparse.Namespace) -> int:
    cdir = ContainerDir(args.root, check_id(args.id))
    print(json.dumps(public_state(cdir.load()), indent=2))
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    cdir = ContainerDir(args.root, check_id(args.id))
    number = parse_signal(args.signal)
    if cdir.load()["status"] == "stopped":
        raise OciError("container not running")
    cdir.request("signal", signal=number, all=args.all)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    cdir = ContainerDir(args.root, check_id(args.id))
    try:
        state = cdir.load()
    except OciError:
        if args.force and not cdir.exists():
            return 0  # as runc: forcing away what is not there succeeds
        raise
    status = state["status"]
    if status in ("running", "paused", "creating") and not args.force:
        raise OciError(f"cannot delete container {cdir.id} that is not stopped: {status}")
    if status != "stopped":
        try:
            cdir.request("delete")
        except OciError:
            if not args.force:
                raise
        _wait_gone(state)
    elif state.get("died"):
        _forget(cdir, args)
    hooks.warn(hooks.load(cdir), ("poststop",), {**public_state(state), "status": "stopped"})
    _remove_dir(cdir)
    return 0


def _forget(cdir: ContainerDir, args: argparse.Namespace) -> None:
    """Its resident was killed: a helper gives back what it held (rare: it costs
    the heavy imports the front end avoids)."""
    import subprocess
    try:
        done = subprocess.run(resident_argv(cdir, config_path(args), "--forget"),
                              timeout=FORGET_WAIT_S, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
        failed = done.returncode != 0
    except subprocess.TimeoutExpired:
        failed = True
    if failed:  # as runc's delete, silent when it worked
        print(f"vmfactory-oci: warning: container {cdir.id}: its VM is given back at its "
              f"lease's end", file=sys.stderr)


def _wait_gone(state: dict[str, Any]) -> None:
    """Until the resident exited (it gives the VM back first); killed past the wait."""
    deadline = time.monotonic() + DELETE_WAIT_S
    while ContainerDir.resident_alive(state):
        if time.monotonic() > deadline:
            os.kill(int(state["pid"]), signal.SIGKILL)  # its lease ends with its TTL
            return
        time.sleep(0.02)


def _remove_dir(cdir: ContainerDir) -> None:
    for name in os.listdir(cdir.path) if cdir.exists() else ():
        try:
            os.unlink(cdir.path / name)
        except OSError:
            pass
    try:
        cdir.path.rmdir()
    except FileNotFoundError:
        pass


def cmd_pause_resume(args: argparse.Namespace) -> int:
    cdir = ContainerDir(args.root, check_id(args.id))
    status = cdir.load()["status"]
    want = "running" if args.command == "pause" else "paused"
    if status != want:
        raise OciError(f"container not {want}" if want == "running"
                       else "container not paused")
    cdir.request(args.command)
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    cdir = ContainerDir(args.root, check_id(args.id))
    if cdir.load()["status"] == "stopped":
        raise OciError("container not running")
    processes = cdir.request("ps")["processes"]
    if args.format == "json":
        print(json.dumps([p["pid"] for p in processes]))
        return 0
    print(f"{'PID':>6} {'PPID':>6} {'STAT':<4}  CMD")
    for p in processes:
        print(f"{p['pid']:>6} {p['ppid']:>6} {p['state']:<4}  {p['cmdline']}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    states = []
    for name in sorted(os.listdir(args.root)) if args.root.is_dir() else ():
        cdir = ContainerDir(args.root, name)
        if not (cdir.state_file.exists() or cdir.log.exists()):
            continue  # not a container of ours (the root may be shared)
        try:
            states.append(ContainerDir(args.root, check_id(name)).load())
        except OciError:
            continue  # vanished while listing, or not ours
    if args.quiet:
        for s in states:
            print(s["id"])
    elif args.format == "json":
        print(json.dumps([{**public_state(s), "rootfs": s.get("rootfs", ""),
                           "owner": s.get("owner", "root")} for s in states]))
    else:
        print(f"{'ID':<20} {'PID':<8} {'STATUS':<10} {'BUNDLE':<40} CREATED")
        for s in states:
            pid = s["pid"] if s["status"] != "stopped" else 0
            print(f"{s['id']:<20} {pid:<8} {s['status']:<10} {s.get('bundle', ''):<40} "
                  f"{s.get('created', '')}")
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    print(json.dumps({
        "ociVersionMin": "1.0.0", "ociVersionMax": OCI_VERSION,
        "hooks": [], "mountOptions": [],
        "linux": {"namespaces": ["cgroup", "ipc", "mount", "network", "pid", "uts"],
                  "capabilities": [], "cgroup": {"v1": False, "v2": False, "systemd": False},
                  "seccomp": {"enabled": False}, "apparmor": {"enabled": False},
                  "selinux": {"enabled": False}},
        "annotations": {"io.github.vmfactory.runtime": "vm",
                        "io.github.vmfactory.sandbox": "one VM per container"},
    }, indent=2))
    return 0


COMMANDS = {"create": cmd_create, "start": cmd_start, "state": cmd_state, "kill": cmd_kill,
            "delete": cmd_delete, "pause": cmd_pause_resume, "resume": cmd_pause_resume,
            "ps": cmd_ps, "list": cmd_list, "features": cmd_features, "exec": execs.cmd_exec}


# --- errors, as runc reports them ---------------------------------------------------------

def log_error(args: argparse.Namespace | None, message: str) -> None:
    """One line on stderr; with --log, the same as runc writes it there."""
    print(message, file=sys.stderr)
    if args is None or not args.log:
        return
    now = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    if args.log_format == "json":
        line = json.dumps({"level": "error", "msg": message, "time": now})
    else:
        line = f'time="{now}" level=error msg={json.dumps(message)}'
    try:
        with open(args.log, "a") as f:
            f.write(line + "\n")
    except OSError:
        pass  # the message is on stderr anyway


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = None
    try:
        for arg in argv:
            arg.encode("utf-8")
        args = _parser().parse_args(argv)
        if args.version:
            print(f"{PROG} version {VERSION}\nspec: {OCI_VERSION}")
            return 0
        if args.command is None:
            raise OciError("a command is required (create, start, state, kill, delete, ...)")
        return COMMANDS[args.command](args)
    except UnicodeEncodeError:
        log_error(args, "an argument is not valid UTF-8")
    except OciError as exc:
        log_error(args, str(exc))
    except OSError as exc:
        log_error(args, f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}")
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug still answers in one line
        log_error(args, f"internal error: {type(exc).__name__}: {str(exc)[:300]}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
