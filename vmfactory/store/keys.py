"""Key rules shared by every store backend.

A key is a ``/``-separated list of parts.  Each part matches
``[A-Za-z0-9._@:+=-]+``, is not ``.`` or ``..`` and is at most
:data:`MAX_PART_LENGTH` characters; the whole key is at most
:data:`MAX_KEY_LENGTH` characters.  Empty parts (leading, trailing or double
``/``) are not allowed.  Keys are therefore always printable ASCII, which lets
backends map them to file names or byte strings without escaping.
"""

from __future__ import annotations

import re

from vmfactory.store.errors import InvalidKey

__all__ = [
    "MAX_KEY_LENGTH",
    "MAX_PART_LENGTH",
    "PART_PATTERN",
    "key_in_prefix",
    "validate_key",
    "validate_prefix",
]

MAX_KEY_LENGTH = 512
"""Longest allowed key, in characters."""

MAX_PART_LENGTH = 200
"""Longest allowed part: file names are limited to 255 bytes on Linux, and the
filesystem backend appends a suffix to each part."""

PART_PATTERN = re.compile(r"[A-Za-z0-9._@:+=-]+")
"""What a single key part must fully match."""


def validate_key(key: object) -> str:
    """Return ``key`` unchanged if it is a valid store key.

    Raises :class:`InvalidKey` (naming the key) otherwise.
    """
    if not isinstance(key, str):
        raise InvalidKey(key, f"must be a str, not {type(key).__name__}")
    if not key:
        raise InvalidKey(key, "must not be empty")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKey(key, f"longer than {MAX_KEY_LENGTH} characters ({len(key)})")
    for part in key.split("/"):
        _validate_part(key, part)
    return key


def _validate_part(key: str, part: str) -> None:
    if not part:
        raise InvalidKey(key, "empty part (leading, trailing or double '/')")
    if part in (".", ".."):
        raise InvalidKey(key, f"part {part!r} is not allowed")
    if len(part) > MAX_PART_LENGTH:
        raise InvalidKey(key, f"part longer than {MAX_PART_LENGTH} characters")
    if not PART_PATTERN.fullmatch(part):
        raise InvalidKey(key, f"part {part!r} has characters outside [A-Za-z0-9._@:+=-]")


def validate_prefix(prefix: object) -> str:
    """Validate a :meth:`Store.list` prefix and return it unchanged.

    ``""`` selects every key.  ``"a/b/"`` (trailing slash) selects keys strictly
    under ``a/b``.  ``"a/b"`` selects the key ``a/b`` itself and keys under it.
    Apart from one optional trailing ``/`` the prefix follows the key rules, so
    prefixes always fall on part boundaries.
    """
    if not isinstance(prefix, str):
        raise InvalidKey(prefix, f"prefix must be a str, not {type(prefix).__name__}")
    if prefix == "":
        return prefix
    base = prefix[:-1] if prefix.endswith("/") else prefix
    if not base:
        raise InvalidKey(prefix, "prefix must not be a bare '/'; use '' for all keys")
    try:
        validate_key(base)
    except InvalidKey as exc:
        raise InvalidKey(prefix, f"bad prefix: {exc.reason}") from None
    return prefix


def key_in_prefix(key: str, prefix: str) -> bool:
    """Tell whether ``key`` is selected by a validated ``prefix``."""
    if prefix == "":
        return True
    if prefix.endswith("/"):
        return key.startswith(prefix)
    return key == prefix or key.startswith(prefix + "/")
