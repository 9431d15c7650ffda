"""A loaded bundle as the agent is asked for it: the process request and the
container's setup, a directory bind turned into a read-only disk image (the
root's image cache) with a serial of its own."""

from __future__ import annotations

import secrets
from pathlib import Path

from runtime_client.bundles.confine import Confinement
from runtime_client.bundles.images import ImageCache
from runtime_client.bundles.loading import ProcessSpec
from vmfactory.agent.client import ContainerSetup, MountRequest, ProcessRequest

Disks = tuple[tuple[str, Path], ...]  # (serial, image) of each extra read-only disk


def process_request(spec: ProcessSpec, *, stdio: bool, rows: int = 0,
                    cols: int = 0) -> ProcessRequest:
    lim = spec.limits
    return ProcessRequest(
        args=spec.args, env=spec.env, cwd=spec.cwd, uid=spec.user.uid, gid=spec.user.gid,
        groups=spec.user.additional_gids, terminal=spec.terminal, stdio=stdio, rows=rows,
        cols=cols, rlimits=lim.rlimits, capabilities=lim.capabilities,
        no_new_privileges=lim.no_new_privileges, oom_score_adj=lim.oom_score_adj)


def container_setup(c: Confinement, images: ImageCache) -> tuple[ContainerSetup, Disks]:
    """The setup, and the disks to plug before the create (built now if not cached)."""
    mounts, disks = [], []
    for m in c.mounts:
        if m.type == "dir":
            assert m.source is not None
            serial = "m" + secrets.token_hex(6)
            disks.append((serial, images.image_for(m.source)))
            mounts.append(MountRequest("disk", m.destination, m.options, disk_serial=serial))
        else:
            mounts.append(MountRequest(m.type, m.destination, m.options, m.data, m.mode))
    r = c.resources
    resources = (r.memory_limit, r.cpu_quota, r.cpu_period, r.pids_limit)
    setup = ContainerSetup(mounts=tuple(mounts) if mounts else None,
                           masked_paths=c.masked_paths, readonly_paths=c.readonly_paths,
                           sysctl=c.sysctl, resources=resources if any(resources) else None)
    return setup, tuple(disks)
