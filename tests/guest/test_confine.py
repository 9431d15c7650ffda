"""The guest's reading of a bundle's confinement, without a VM: mount options
as runc reads them, capability masks, and CreateContainer's validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmfactory.guest.agent import confine, linux, staging
from vmfactory.guest.agent.errors import BadRequest
from vmfactory.proto import agent_pb2 as pb


def test_mount_options_split_into_flags_and_data() -> None:
    flags, data = confine.mount_flags(["nosuid", "noexec", "strictatime", "mode=755",
                                       "size=65536k", "rprivate", "rw"])
    assert flags == linux.MS_NOSUID | linux.MS_NOEXEC | linux.MS_STRICTATIME
    assert data == "mode=755,size=65536k"
    assert confine.mount_flags(["ro", "bind"]) == (linux.MS_RDONLY, "")


def test_capability_masks_ignore_names_this_kernel_lacks() -> None:
    assert confine._mask(["CAP_CHOWN", "CAP_KILL"]) == (1 << 0) | (1 << 5)
    assert confine._mask(["CAP_NOT_YET_INVENTED"]) == 0
    assert confine.CAP_NUMBERS["CAP_SYS_ADMIN"] == 21
    assert confine.CAP_NUMBERS["CAP_CHECKPOINT_RESTORE"] == 40


def _request(**kw: object) -> pb.CreateContainerRequest:
    return pb.CreateContainerRequest(container_id="c1", disk_serial="s1", oci_mounts=True, **kw)


def test_a_valid_setup_is_kept_in_order() -> None:
    setup = staging.setup_of(_request(
        mounts=[pb.Mount(type="proc", destination="/proc"),
                pb.Mount(type="file", destination="/etc/hosts", data=b"x", mode=0o100644),
                pb.Mount(type="disk", destination="/data/./", disk_serial="m1")],
        masked_paths=["/proc/kcore"], sysctl={"kernel.domainname": "a"},
        resources=pb.Resources(memory_limit=1 << 26)))
    assert setup.mounts is not None
    assert [m["destination"] for m in setup.mounts] == ["/proc", "/etc/hosts", "/data"]
    assert setup.mounts[1]["mode"] == 0o644
    assert setup.resources is not None and setup.resources.memory_limit == 1 << 26


def test_without_oci_mounts_the_defaults_stand() -> None:
    assert staging.setup_of(pb.CreateContainerRequest(container_id="c1")).mounts is None


@pytest.mark.parametrize("kw", [
    {"mounts": [pb.Mount(type="nfs", destination="/x")]},
    {"mounts": [pb.Mount(type="tmpfs", destination="x")]},
    {"mounts": [pb.Mount(type="tmpfs", destination="/a/../../etc")]},
    {"mounts": [pb.Mount(type="tmpfs", destination="/")]},
    {"mounts": [pb.Mount(type="tmpfs", destination="/x", options=["a,b"])]},
    {"mounts": [pb.Mount(type="disk", destination="/x", disk_serial="../vda")]},
    {"mounts": [pb.Mount(type="file", destination="/x", data=b"x" * (staging.MAX_FILE_BYTES + 1))]},
    {"mounts": [pb.Mount(type="tmpfs", destination=f"/m{i}") for i in range(65)]},
    {"masked_paths": ["relative"]},
    {"sysctl": {"../../etc/passwd": "x"}},
    {"resources": pb.Resources(memory_limit=-5)},
])
def test_bad_setups_are_bad_requests(kw: dict[str, object]) -> None:
    with pytest.raises(BadRequest):
        staging.setup_of(_request(**kw))


def test_a_mount_point_that_is_a_symlink_is_replaced_one_on_the_way_refused(
        tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "resolv.conf").symlink_to("/run/elsewhere/resolv.conf")
    target = confine._target(tmp_path, "/etc/resolv.conf", True)
    assert target.is_file() and not target.is_symlink()
    (tmp_path / "var").symlink_to("/")
    with pytest.raises(OSError, match="symlink"):
        confine._target(tmp_path, "/var/lib/x", False)
    assert confine._target(tmp_path, "/new/dir", False).is_dir()
