"""deploy/kubernetes/: every manifest is valid against the Kubernetes API schemas
(kubernetes-validate, strict: no unknown fields), the DaemonSet's config is one
the daemon loads, and the node-side runtime configs name vmfactory-oci."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from vmfactory.config import load_config

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
K8S_VERSION = "1.30"


def documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            docs.append((f"{path.name}#{i}-{doc['kind']}", doc))
    return docs


@pytest.mark.parametrize(("name", "doc"), documents(), ids=[n for n, _ in documents()])
def test_every_manifest_is_valid_kubernetes(name: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_a_broken_manifest_is_caught() -> None:
    """The check above can fail: an unknown field and a wrong type are refused."""
    runtime_class = next(d for n, d in documents() if d["kind"] == "RuntimeClass")
    for broken in ({**runtime_class, "handlr": "x"},
                   {**runtime_class, "overhead": {"podFixed": "lots"}}):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_the_daemonsets_config_loads(tmp_path: Path) -> None:
    config_map = next(d for _, d in documents() if d["kind"] == "ConfigMap")
    path = tmp_path / "vmfactory.toml"
    path.write_text(config_map["data"]["vmfactory.toml"])
    config = load_config(path)
    assert [p.name for p in config.pools] == ["default"]
    assert config.pools[0].sizing == "adaptive"
    daemonset = next(d for _, d in documents() if d["kind"] == "DaemonSet")
    mounts = {m["mountPath"] for m in
              daemonset["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert str(config.daemon.socket.parent) in mounts  # the node's runtime reaches it


def test_the_runtime_handlers_name_vmfactory_oci() -> None:
    runtime_class = next(d for _, d in documents() if d["kind"] == "RuntimeClass")
    containerd = tomllib.loads((DEPLOY / "containerd-runtime.toml").read_text())
    runtimes = containerd["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]
    entry = runtimes[runtime_class["handler"]]
    assert entry["runtime_type"] == "io.containerd.runc.v2"
    assert entry["options"]["BinaryName"].endswith("/vmfactory-oci")
    crio = tomllib.loads((DEPLOY / "crio-runtime.conf").read_text())
    handler = crio["crio"]["runtime"]["runtimes"][runtime_class["handler"]]
    assert handler["runtime_path"].endswith("/vmfactory-oci")
