"""``vmfactory-runtime``: containers from OCI bundles in factory VMs, docker-style.

Exit codes: ``run``/``exec`` exit with the container process's code (128+N when
signal N ended it).  Otherwise 0 success, 2 bad usage, 125 a runtime error, 126
the program could not be run, 127 the program was not found (one line on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from runtime_client.bundles import find_executable, load_bundle
from runtime_client.errors import ExecutableNotFound
from runtime_client.sandbox import Runtime
from runtime_client.signames import signal_number
from vmfactory.config import Config, load_config
from vmfactory.errors import ConfigError, InvalidRequest, VmFactoryError, quote
from vmfactory.guest.agent.errors import CannotExecute
from vmfactory.util.tasks import finish

logger = logging.getLogger(__name__)

PROG = "vmfactory-runtime"
EXIT_ERROR, EXIT_NOT_FOUND = 125, 127  # and 126 or 127 from CannotExecute.exit_code


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, help="TOML config over the embedded default")
    p.add_argument("--shim", help="katashimbuiltin | katashim | noopshim (default: config)")
    p.add_argument("--proxy", help="noProxy | kataProxy | kataProxyBuiltin | noopProxy")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="create and start a container from an OCI bundle")
    run.add_argument("--rm", action="store_true", help="remove it (and its sandbox) at exit")
    run.add_argument("-d", "--detach", action="store_true", help="start it and print its name")
    run.add_argument("--name", help="container name (default: random)")
    run.add_argument("--sandbox", help="join this existing sandbox instead of a new one")
    run.add_argument("--timings", action="store_true", help="print timings (JSON) on stderr")
    _add_stdio(run)
    run.add_argument("bundle", type=Path)
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD... overrides process.args")
    ex = sub.add_parser("exec", help="run another process in a running container")
    _add_stdio(ex)
    ex.add_argument("container")
    ex.add_argument("cmd", nargs=argparse.REMAINDER)
    sub.add_parser("ps", help="processes in a container").add_argument("container")
    kill = sub.add_parser("kill", help="signal a container's process")
    kill.add_argument("-s", "--signal", default="KILL", help="name or number (default KILL)")
    kill.add_argument("--all", action="store_true", help="every process in the container")
    kill.add_argument("container")
    rm = sub.add_parser("rm", help="remove containers")
    rm.add_argument("-f", "--force", action="store_true", help="kill them first if running")
    rm.add_argument("containers", nargs="+")
    ls = sub.add_parser("list", help="sandboxes and their containers")
    ls.add_argument("--json", action="store_true")
    sb = sub.add_parser("sandbox", help="sandboxes").add_subparsers(dest="sandbox_cmd",
                                                                    required=True)
    sb.add_parser("stop", help="stop a sandbox (kills its containers)").add_argument("id")
    sb.add_parser("rm", help="stop and delete a sandbox").add_argument("id")
    return p


def _add_stdio(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--interactive", action="store_true", help="relay stdin")
    p.add_argument("-t", "--tty", action="store_true", help="give the process a terminal")


def parse_signal(value: str) -> int:
    try:
        return signal_number(value)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


def _command(args: argparse.Namespace) -> list[str] | None:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    return cmd or None


def _term_size() -> tuple[int, int]:
    for fd in (0, 1):
        if os.isatty(fd):
            size = os.get_terminal_size(fd)
            return size.lines, size.columns
    return 0, 0


async def cmd_run(rt: Runtime, args: argparse.Namespace) -> int:
    bundle = load_bundle(args.bundle)  # before any VM: a bad bundle costs nothing
    cmd = _command(args)
    program = (cmd or list(bundle.process.args))[0]
    if find_executable(bundle, program) is None:
        raise ExecutableNotFound(f"executable {quote(program)} not found in {bundle.rootfs}")
    name = args.name or "c" + secrets.token_hex(5)
    own = args.sandbox is None
    sandbox = await (rt.create_sandbox(name) if own else rt.open_sandbox(args.sandbox))
    rows, cols = _term_size() if args.tty else (0, 0)
    t0 = time.monotonic()
    first: dict[str, float] = {}
    try:
        container = await sandbox.create_container(
            bundle, name, args=cmd, terminal=True if args.tty else None, rows=rows, cols=cols)
        if args.detach:
            await container.start()
            print(name)
            return 0
        code = await container.run(
            stdin=0 if args.interactive else None,
            on_first_output=lambda: first.setdefault("first_output_ms",
                                                     (time.monotonic() - t0) * 1000))
    except BaseException:
        if own:
            await finish(sandbox.delete())
        raise
    if args.timings:
        print(json.dumps({**sandbox.timings, **container.timings, **first}), file=sys.stderr)
    if args.rm:
        await (sandbox.delete() if own else container.remove(force=True))
    return code


async def cmd_exec(rt: Runtime, args: argparse.Namespace) -> int:
    cmd = _command(args)
    if not cmd:
        raise InvalidRequest("exec needs a command: exec CONTAINER -- CMD...")
    container = await rt.open_container(args.container)
    rows, cols = _term_size() if args.tty else (0, 0)
    exec_id = await container.exec(cmd, terminal=args.tty, rows=rows, cols=cols)
    return await container.attach(stdin=0 if args.interactive else None, exec_id=exec_id,
                                  terminal=args.tty)


async def cmd_ps(rt: Runtime, args: argparse.Namespace) -> int:
    container = await rt.open_container(args.container)
    print(f"{'PID':>6} {'PPID':>6} {'STAT':<4} {'GUEST-PID':>9}  COMMAND")
    for p in await container.processes():
        print(f"{p.pid:>6} {p.ppid:>6} {p.state:<4} {p.guest_pid:>9}  {p.cmdline}")
    return 0


async def cmd_kill(rt: Runtime, args: argparse.Namespace) -> int:
    container = await rt.open_container(args.container)
    await container.signal(parse_signal(args.signal), all=args.all)
    return 0


async def cmd_rm(rt: Runtime, args: argparse.Namespace) -> int:
    failed = 0
    for name in args.containers:
        try:
            await (await rt.open_container(name)).remove(force=args.force)
            print(name)
        except VmFactoryError as exc:
            print(f"{PROG}: {name}: {exc}", file=sys.stderr)
            failed += 1
    return EXIT_ERROR if failed else 0


async def cmd_list(rt: Runtime, args: argparse.Namespace) -> int:
    sandboxes: list[dict[str, Any]] = []
    for record in rt.sandboxes():
        record["containers"] = rt.records.containers(record["id"])
        sandboxes.append(record)
    if args.json:
        print(json.dumps({"sandboxes": sandboxes}, indent=2))
        return 0
    print(f"{'SANDBOX':<14} {'STATE':<9} {'VM':<10} {'SOURCE':<6} {'CONTAINER':<14} "
          f"{'STATE':<9} COMMAND")
    for s in sandboxes:
        vm = s["vm"]
        head = f"{s['id']:<14} {s['state']:<9} {vm['vm_id']:<10} {vm.get('source', ''):<6}"
        if not s["containers"]:
            print(head)
        for c in s["containers"]:
            code = "" if c.get("exit_code") is None else f"({c['exit_code']})"
            print(f"{head} {c['name']:<14} {c['state'] + code:<9} "
                  f"{' '.join(c['process']['args'])}")
    return 0


async def cmd_sandbox(rt: Runtime, args: argparse.Namespace) -> int:
    sandbox = await rt.open_sandbox(args.id)
    await (sandbox.stop() if args.sandbox_cmd == "stop" else sandbox.delete())
    print(args.id)
    return 0


COMMANDS = {"run": cmd_run, "exec": cmd_exec, "ps": cmd_ps, "kill": cmd_kill, "rm": cmd_rm,
            "list": cmd_list, "sandbox": cmd_sandbox}


async def _main(config: Config, args: argparse.Namespace) -> int:
    rt = Runtime(config, shim=args.shim, proxy=args.proxy)
    try:
        return await COMMANDS[args.command](rt, args)
    finally:
        await finish(rt.close())


def exit_code_for(exc: VmFactoryError) -> int:
    """The exit code table: a program missing from the bundle, or whose execve
    failed with ENOENT, is 127; another execve failure 126; anything else 125."""
    if isinstance(exc, ExecutableNotFound):
        return EXIT_NOT_FOUND
    if isinstance(exc, CannotExecute):
        return exc.exit_code
    return EXIT_ERROR


def _undecodable(argv: list[str]) -> str | None:
    """The first argument that is not valid UTF-8 (it reaches the guest as a
    protobuf string, which must be), as a message; None if all are."""
    for i, arg in enumerate(argv, 1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            return f"argument {i} is not valid UTF-8: {quote(arg)}"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if (problem := _undecodable(argv)) is not None:
        print(f"{PROG}: {problem}", file=sys.stderr)
        return EXIT_ERROR
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format=f"{PROG}: %(levelname)s: %(message)s")
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_main(config, args))
    except VmFactoryError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
