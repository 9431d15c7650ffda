"""What a caller may ask: every request value bounded and checked before use.

Transports convert their messages into these types and the daemon core checks
them here, so a hostile value (NaN, a 20 KB string, a size that does not fit)
becomes an :class:`InvalidRequest` with a short message, whatever transport it
came through.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from vmfactory.errors import InvalidRequest, quote

MAX_LEASE_ID = 64
MAX_CLIENT = 256
MAX_NAME = 64
LEASE_ID_RE = re.compile(r"^[0-9a-f]{1,64}$")


def check_text(field: str, value: str, limit: int) -> str:
    """``value`` if it is at most ``limit`` characters without NUL; else InvalidRequest."""
    if len(value) > limit or "\0" in value:
        raise InvalidRequest(f"{field} {quote(value)} is longer than {limit} characters "
                             "or has a NUL byte")
    return value


def check_lease_id(lease_id: str) -> str:
    if not LEASE_ID_RE.match(lease_id):
        raise InvalidRequest(f"lease id {quote(lease_id)} is not a lease id")
    return lease_id


def check_seconds(field: str, value: float, limit: float, *, zero: bool) -> float:
    """A finite number of seconds in [0 or more, ``limit``]."""
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero) or value > limit:
        bounds = f"between 0 and {limit:g}" if zero else f"more than 0 and at most {limit:g}"
        raise InvalidRequest(f"{field} must be {bounds} seconds, not {quote(value)}")
    return value


@dataclass(frozen=True)
class VmRequest:
    """A GetVM request after conversion; 0 / "" mean the defaults."""

    cpus: int = 0
    memory_mib: int = 0
    image: str = ""
    base: str = ""
    lease_ttl_s: float = 0.0
    client: str = ""
    tenant: str = ""
    request_id: str = ""

    def checked(self) -> VmRequest:
        """This request if its strings are bounded and its numbers in range."""
        check_text("image", self.image, MAX_NAME)
        check_text("base", self.base, MAX_NAME)
        check_text("client", self.client, MAX_CLIENT)
        check_text("tenant", self.tenant, MAX_NAME)
        check_text("request_id", self.request_id, MAX_LEASE_ID)
        if self.cpus < 0 or self.memory_mib < 0:
            raise InvalidRequest(f"cpus and memory_mib must not be negative, not "
                                 f"{quote(self.cpus)} / {quote(self.memory_mib)}")
        if not math.isfinite(self.lease_ttl_s):
            raise InvalidRequest(f"lease_ttl_s must be a finite number, not "
                                 f"{quote(self.lease_ttl_s)}")
        return self
