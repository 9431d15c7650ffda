"""Kata's mode names (shims, proxies), with their deprecated aliases."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from runtime_client.errors import ClientError
from vmfactory.errors import quote

logger = logging.getLogger(__name__)


def canonical_mode(kind: str, name: str, valid: Sequence[str],
                   aliases: Mapping[str, str]) -> str:
    """``name`` with a deprecated alias resolved (and warned about); ClientError
    naming the valid modes for anything else."""
    if name in aliases:
        logger.warning("%s %r is deprecated; using %r", kind, name, aliases[name])
        return aliases[name]
    if name not in valid:
        raise ClientError(f"unknown {kind} {quote(name)}; valid: {', '.join((*valid, *aliases))}")
    return name
