"""Tenants on the stand-in: a tenant's pool serves only its group's members, and
its VMs come from a template factory of its own (no memory shared with another
tenant's clones)."""

from __future__ import annotations

import grp
import os
import time
from pathlib import Path

import pytest

from tests.daemon.conftest import ME, POOL, standin_config, started
from vmfactory.daemon.callers import Caller
from vmfactory.daemon.core import VmRequest
from vmfactory.errors import InvalidRequest, PermissionDenied

GROUP = grp.getgrgid(0).gr_name  # root's group: the tenant the test's caller is in


async def test_tenant_pools_are_their_groups_and_their_templates_their_own(root: Path) -> None:
    config = standin_config(root, [POOL, {**POOL, "name": "t", "tenant": GROUP}])
    daemon = await started(config)
    try:
        assert set(daemon.templates) == {"", GROUP}
        shared, own = daemon.templates[""], daemon.templates[GROUP]
        assert own is not shared and own.name != shared.name
        assert own.template.directory != shared.template.directory
        member = ME
        outsider = Caller(4242, 4242, os.getpid(), frozenset({4242}))
        lease = await daemon.get_vm(VmRequest(tenant=GROUP), time.monotonic() + 30, member)
        assert lease.pool == "t" and lease.tenant == GROUP
        await daemon.release(lease.id, member)
        with pytest.raises(PermissionDenied, match="not in the group"):
            await daemon.get_vm(VmRequest(tenant=GROUP), time.monotonic() + 30, outsider)
        with pytest.raises(PermissionDenied):
            await daemon.get_vm(VmRequest(tenant="no-such-group"), time.monotonic() + 5,
                                outsider)
        with pytest.raises(InvalidRequest):
            await daemon.get_vm(VmRequest(tenant="x" * 100), time.monotonic() + 5, outsider)
        # Shared pools serve anyone; the outsider's lease has a TTL it did not ask for.
        lease = await daemon.get_vm(VmRequest(), time.monotonic() + 30, outsider)
        assert lease.pool == "p" and lease.owner_uid == 4242 and lease.ttl_s == 300.0
        with pytest.raises(PermissionDenied):
            await daemon.release(lease.id, Caller(4343, 4343, 1, frozenset()))
        await daemon.release(lease.id, outsider)
    finally:
        await daemon.shutdown()
