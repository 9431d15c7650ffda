"""The ``vmfactory`` command line.

Exit codes: 0 success, 1 a vmfactory error (one line on stderr), 2 bad usage or
configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

from vmfactory.config import Config, load_config
from vmfactory.errors import ConfigError, DaemonError, VmFactoryError

logger = logging.getLogger(__name__)


def _add_vm_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpus", type=int, help="vCPUs (default: config vm.cpus)")
    p.add_argument("--memory", type=int, metavar="MIB", help="memory (default: vm.memory_mib)")
    p.add_argument("--accel", choices=["auto", "kvm", "tcg"], help="accelerator")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmfactory", description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, help="TOML config over the embedded default")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    image = sub.add_parser("image", help="guest image").add_subparsers(dest="image_cmd",
                                                                      required=True)
    build = image.add_parser("build", help="build the guest image (cached by content)")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    image.add_parser("info", help="show the current guest image")

    demo = sub.add_parser("demo", help="the main job: a daemon with a warm pool, one VM "
                                       "handed out over gRPC and used, timings printed")
    demo.add_argument("--json", action="store_true", help="print one JSON object")
    sub.add_parser("init", help="run the factory daemon in the foreground")
    status = sub.add_parser("status", help="pools and VMs of the running daemon")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    destroy = sub.add_parser("destroy", help="stop the running daemon cleanly")
    destroy.add_argument("--timeout", type=float, default=60.0, help="seconds to wait")

    template = sub.add_parser("template", help="the VM template clones are made from")
    tsub = template.add_subparsers(dest="template_cmd", required=True)
    tsub.add_parser("create", help="boot, save and stop the template VM")
    tsub.add_parser("status", help="show the template and whether it is usable")
    tsub.add_parser("destroy", help="remove the template's files")

    boot = sub.add_parser("boot", help="cold-boot one VM (CreateNew), talk to its agent, "
                                       "print timings, stop it")
    _add_vm_options(boot)
    boot.add_argument("--json", action="store_true", help="print one JSON object")
    boot.add_argument("--from-template", action="store_true",
                      help="clone the template (created on first use) instead of booting")
    return p


def _config(args: argparse.Namespace) -> Config:
    overrides: dict[str, Any] = {}
    vm = {k: v for k, v in (("cpus", getattr(args, "cpus", None)),
                            ("memory_mib", getattr(args, "memory", None)),
                            ("accel", getattr(args, "accel", None))) if v is not None}
    if vm:
        overrides["vm"] = vm
    return load_config(args.config, overrides)


def _image(config: Config, args: argparse.Namespace) -> int:
    from vmfactory.guest.image import ImageBuilder

    builder = ImageBuilder(config.paths.state_dir)
    img = builder.ensure(force=getattr(args, "force", False))
    print(json.dumps({"key": img.key, "directory": str(img.directory),
                      "kernel_release": img.kernel_release,
                      "size_mib": {k: round(v, 1) for k, v in img.manifest["size_mib"].items()},
                      "build_seconds": img.manifest["build_seconds"]}, indent=2))
    return 0


def _template(config: Config, args: argparse.Namespace) -> int:
    from vmfactory.app import make_bases, make_hypervisor

    _, factory = make_bases(config, make_hypervisor(config))
    if args.template_cmd == "create":
        asyncio.run(factory.ensure_template())
    elif args.template_cmd == "destroy":
        asyncio.run(factory.template.destroy())
    print(json.dumps(factory.template.status(), indent=2))
    return 0


def _init(config: Config, args: argparse.Namespace, plugins: dict[str, Any]) -> int:
    from vmfactory.app import serve

    logging.getLogger("vmfactory").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    asyncio.run(serve(config, **plugins))
    return 0


async def _client_call(config: Config, what: str, timeout: float = 10.0) -> Any:
    from vmfactory.server.client import FactoryClient

    async with FactoryClient(config.daemon.socket, timeout=timeout) as client:
        try:
            if what == "status":
                return await client.status()
            await client.quit()
        except DaemonError as exc:
            raise DaemonError(f"daemon at {config.daemon.socket}: {exc}") from exc
        return None


def _status(config: Config, args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    from vmfactory.demo import format_status

    reply = asyncio.run(_client_call(config, "status"))
    if args.json:
        print(json.dumps(MessageToDict(reply, always_print_fields_with_no_presence=True)))
    else:
        print(format_status(reply))
    return 0


def _destroy(config: Config, args: argparse.Namespace) -> int:
    import time

    asyncio.run(_client_call(config, "quit"))
    deadline = time.monotonic() + args.timeout
    while config.daemon.socket.exists():
        if time.monotonic() > deadline:
            raise VmFactoryError(f"daemon did not stop within {args.timeout:g} s")
        time.sleep(0.1)
    print("daemon stopped")
    return 0


def _demo(config: Config, args: argparse.Namespace) -> int:
    from vmfactory.demo import factory_demo, format_demo

    result = asyncio.run(factory_demo(config))
    print(json.dumps(result) if args.json else format_demo(result))
    return 0


def _boot(config: Config, args: argparse.Namespace) -> int:
    from vmfactory.demo import boot_once, format_boot

    result = asyncio.run(boot_once(config, from_template=args.from_template))
    print(json.dumps(result) if args.json else format_boot(result))
    return 0


def main(argv: list[str] | None = None, **plugins: Any) -> int:
    """Run one command; ``plugins`` (``hypervisor``, ``store``) replace the
    product's in ``init`` (tests inject failures this way)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        config = _config(args)
        if args.command == "init":
            return _init(config, args, plugins)
        handler = {"image": _image, "template": _template, "status": _status,
                   "destroy": _destroy, "demo": _demo, "boot": _boot}[args.command]
        return handler(config, args)
    except ConfigError as exc:
        print(f"vmfactory: {exc}", file=sys.stderr)
        return 2
    except VmFactoryError as exc:
        print(f"vmfactory: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
