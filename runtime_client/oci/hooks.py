"""OCI hooks, run on the host by ``vmfactory-oci`` with the container's state on
stdin, as the runtime spec's Lifecycle says: ``prestart`` and ``createRuntime``
at the end of ``create`` (a failing one fails the create, which is undone),
``poststart`` after ``start`` and ``poststop`` after ``delete`` (a failing one
is a warning).  ``createContainer`` and ``startContainer`` run in the
container's namespaces, which are in the guest, where a host path means nothing:
they are not run, and a bundle that has them gets a warning at create.

The hooks are read from config.json at create, validated, and kept in the
container's directory, so a bundle changed later does not change them.
"""

from __future__ import annotations

import json
import sys

from runtime_client.oci.state import ContainerDir, OciError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

KINDS = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart",
         "poststop")
IN_GUEST = ("createContainer", "startContainer")
MAX_HOOKS = 32
DEFAULT_TIMEOUT_S = 30
MAX_TIMEOUT_S = 300
HOOKS_FILE = "hooks.json"


def _hook(raw: object, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise OciError(f"{where} must be an object")
    path = raw.get("path")
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise OciError(f"{where}.path must be an absolute path")
    out: dict[str, Any] = {"path": path}
    for key in ("args", "env"):
        value = raw.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or not all(isinstance(v, str) and "\0" not in v
                                                  for v in value) or len(value) > 1024:
            raise OciError(f"{where}.{key} must be a list of strings")
        out[key] = value
    timeout = raw.get("timeout", DEFAULT_TIMEOUT_S)
    if (isinstance(timeout, bool) or not isinstance(timeout, int)
            or not 0 < timeout <= MAX_TIMEOUT_S):
        raise OciError(f"{where}.timeout must be an integer in 1..{MAX_TIMEOUT_S}")
    out["timeout"] = timeout
    return out


def parse(spec: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The bundle's hooks by kind, validated; OciError naming the field."""
    raw = spec.get("hooks")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise OciError("config.json: hooks must be an object")
    out = {}
    for kind, hooks in raw.items():
        if kind not in KINDS:
            continue  # a newer spec's: runc ignores them too
        if not isinstance(hooks, list) or len(hooks) > MAX_HOOKS:
            raise OciError(f"config.json: hooks.{kind} must be a list of at most {MAX_HOOKS}")
        out[kind] = [_hook(h, f"config.json: hooks.{kind}[{i}]") for i, h in enumerate(hooks)]
    return out


def save(cdir: ContainerDir, hooks: dict[str, list[dict[str, Any]]]) -> None:
    for kind in IN_GUEST:
        if hooks.get(kind):
            print(f"vmfactory-oci: warning: {kind} hooks run in the container's namespaces, "
                  f"which are in the VM: not run", file=sys.stderr)
    if hooks:
        (cdir.path / HOOKS_FILE).write_text(json.dumps(hooks))


def load(cdir: ContainerDir) -> dict[str, list[dict[str, Any]]]:
    try:
        return json.loads((cdir.path / HOOKS_FILE).read_text())  # type: ignore[no-any-return]
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise OciError(f"container {cdir.id}: unreadable hooks: {exc}") from None


def run(hooks: dict[str, list[dict[str, Any]]], kinds: tuple[str, ...],
        state: dict[str, Any]) -> None:
    """Each hook of ``kinds`` in order, the state JSON on its stdin; OciError for
    the first that fails or outlives its timeout."""
    todo = [(kind, h) for kind in kinds for h in hooks.get(kind, ())]
    if not todo:
        return
    import subprocess  # only when there are hooks: it costs this command ~5 ms
    payload = json.dumps(state).encode()
    for kind, h in todo:
        argv = h.get("args") or [h["path"]]
        env = dict(e.split("=", 1) for e in h.get("env", ()) if "=" in e)
        try:
            done = subprocess.run(argv, executable=h["path"], input=payload, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  timeout=h["timeout"], close_fds=True)
        except subprocess.TimeoutExpired:
            raise OciError(f"{kind} hook {h['path']} did not finish in {h['timeout']} s") from None
        except OSError as exc:
            raise OciError(f"{kind} hook {h['path']}: {exc.strerror}") from None
        if done.returncode != 0:
            tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
            raise OciError(f"{kind} hook {h['path']} exited {done.returncode}: "
                           f"{tail[0][:200]}".rstrip(": "))


def warn(hooks: dict[str, list[dict[str, Any]]], kinds: tuple[str, ...],
         state: dict[str, Any]) -> None:
    """As run(), but a failure is a warning on stderr (poststart, poststop)."""
    try:
        run(hooks, kinds, state)
    except OciError as exc:
        print(f"vmfactory-oci: warning: {exc}", file=sys.stderr)

