"""Sandbox and container records: what another client process needs to find,
list, stop or delete a sandbox after the client that made it died."""

from __future__ import annotations

import re
from typing import Any

from vmfactory.errors import InvalidRequest, NotFound, quote
from vmfactory.store import Store
from vmfactory.store.errors import CorruptRecord, RecordFormatError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(kind: str, name: str) -> str:
    if not NAME_RE.match(name):
        raise InvalidRequest(f"{kind} name {quote(name)} must match {NAME_RE.pattern}")
    return name


class ClientRecords:
    """``sandboxes/<id>`` and ``containers/<name>`` (container names are global, as
    in docker)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def _load(self, key: str) -> dict[str, Any] | None:
        try:
            return self.store.load_json(key)
        except KeyError:
            return None
        except (RecordFormatError, CorruptRecord):
            return None  # set aside by the store, reported in its log

    def _all(self, prefix: str) -> list[dict[str, Any]]:
        out = []
        for key in self.store.list(prefix):
            record = self._load(key)
            if record is not None:
                out.append(record)
        return out

    def save_sandbox(self, record: dict[str, Any]) -> None:
        self.store.save_json(f"sandboxes/{record['id']}", record)

    def sandbox(self, sandbox_id: str) -> dict[str, Any]:
        record = self._load(f"sandboxes/{check_name('sandbox', sandbox_id)}")
        if record is None:
            raise NotFound(f"no sandbox {quote(sandbox_id)}")
        return record

    def has_sandbox(self, sandbox_id: str) -> bool:
        return self._load(f"sandboxes/{sandbox_id}") is not None

    def sandboxes(self) -> list[dict[str, Any]]:
        return sorted(self._all("sandboxes/"), key=lambda r: r.get("created", 0))

    def delete_sandbox(self, sandbox_id: str) -> None:
        self._delete(f"sandboxes/{sandbox_id}")

    def save_container(self, record: dict[str, Any]) -> None:
        self.store.save_json(f"containers/{record['name']}", record)

    def container(self, name: str) -> dict[str, Any]:
        record = self._load(f"containers/{check_name('container', name)}")
        if record is None:
            raise NotFound(f"no container {quote(name)}")
        return record

    def has_container(self, name: str) -> bool:
        return self._load(f"containers/{name}") is not None

    def containers(self, sandbox_id: str | None = None) -> list[dict[str, Any]]:
        records = self._all("containers/")
        if sandbox_id is not None:
            records = [r for r in records if r.get("sandbox") == sandbox_id]
        return sorted(records, key=lambda r: r.get("created", 0))

    def delete_container(self, name: str) -> None:
        self._delete(f"containers/{name}")

    def _delete(self, key: str) -> None:
        try:
            self.store.delete(key)
        except KeyError:
            pass  # already gone: deleting is idempotent
