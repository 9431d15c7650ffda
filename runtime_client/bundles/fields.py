"""Validators shared by the bundle parsers: each raises Invalid naming the field;
load_bundle adds which bundle it is in."""

from __future__ import annotations

import posixpath

from vmfactory.errors import quote

MAX_PATH = 4096


class Invalid(Exception):
    """A config.json problem, its message naming the field."""


def text(value: str, where: str) -> str:
    """``value`` if it has no NUL and is valid Unicode (JSON may carry a lone
    surrogate, which no process argument or protobuf string can hold)."""
    if "\0" in value:
        raise Invalid(f"{where} contains a NUL byte")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Invalid(f"{where} is not valid Unicode (a lone surrogate?)") from None
    return value


def string(value: object, where: str, max_len: int = MAX_PATH) -> str:
    if not isinstance(value, str):
        raise Invalid(f"{where} must be a string")
    if len(value) > max_len:
        raise Invalid(f"{where} is longer than {max_len} characters")
    return text(value, where)


def opt_bool(value: object, where: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise Invalid(f"{where} must be true or false")
    return value


def integer(value: object, where: str, low: int, high: int) -> int:
    # bool is an int subclass; true/false as a number is a config bug, not 1/0.
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise Invalid(f"{where} must be an integer in {low}..{high}")
    return value


def container_path(value: object, where: str) -> str:
    """An absolute path inside the container, normalized, never climbing out."""
    path = string(value, where)
    if not path.startswith("/"):
        raise Invalid(f"{where} must be an absolute path, not {quote(path)}")
    if ".." in path.split("/"):
        raise Invalid(f"{where} must not contain '..': {quote(path)}")
    return posixpath.normpath(path)


def object_list(value: object, where: str, max_items: int) -> list[dict[str, object]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise Invalid(f"{where} must be a list of objects")
    if len(value) > max_items:
        raise Invalid(f"{where} has more than {max_items} entries")
    return value


def string_list(value: object, where: str, max_items: int, max_len: int = MAX_PATH) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise Invalid(f"{where} must be a list of strings")
    if len(value) > max_items:
        raise Invalid(f"{where} has more than {max_items} entries")
    return [string(v, f"{where}[{i}]", max_len) for i, v in enumerate(value)]
