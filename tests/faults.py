"""A TEST DOUBLE of the metadata store that fails on demand, and ``vmfactory init``
run with it.

:class:`FailingStore` wraps a real store and raises ``StoreError`` for the
operations named in ``fail`` (in-process tests set it directly), or in its
trigger file (a daemon process reads it on every operation: the test writes
``save`` or ``delete`` there to make those fail from then on).

``python -m tests.faults TRIGGER --config FILE init`` is ``vmfactory init``
with the configured store wrapped that way.
"""

from __future__ import annotations

import sys
from pathlib import Path

from vmfactory.errors import StoreError
from vmfactory.store import Store, open_store


class FailingStore(Store):
    """``inner``, except that the operations in ``fail`` (or the trigger file) raise."""

    def __init__(self, inner: Store, trigger: Path | None = None) -> None:
        super().__init__(inner.location)
        self.inner = inner
        self.trigger = trigger
        self.fail: set[str] = set()
        self.failed = 0

    def _check(self, op: str) -> None:
        failing = set(self.fail)
        if self.trigger is not None and self.trigger.exists():
            failing |= set(self.trigger.read_text().split())
        if op in failing:
            self.failed += 1
            raise StoreError(f"injected failure: store {op} refused")

    def _save(self, key: str, value: bytes) -> None:
        self._check("save")
        self.inner.save(key, value)

    def _load(self, key: str) -> bytes:
        self._check("load")
        return self.inner.load(key)

    def _delete(self, key: str) -> None:
        self._check("delete")
        self.inner.delete(key)

    def _list(self, prefix: str) -> list[str]:
        self._check("list")
        return self.inner.list(prefix)

    def _close(self) -> None:
        self.inner.close()


def main(argv: list[str]) -> int:
    """``vmfactory`` with the configured store wrapped in a FailingStore."""
    from vmfactory import cli
    from vmfactory.config import load_config

    trigger, rest = Path(argv[0]), argv[1:]
    config = load_config(Path(rest[rest.index("--config") + 1]))
    return cli.main(rest, store=FailingStore(open_store(config.store.url), trigger))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
