"""Progress lines for long steps a person waits on (image builds, benchmarks)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


class Progress:
    """Prints ``[i/n] step ... done (1.2 s)`` lines; ``quiet`` silences it."""

    def __init__(self, total: int, *, out: TextIO | None = None, quiet: bool = False,
                 prefix: str = "") -> None:
        self.total = total
        self.done = 0
        self._out = out or sys.stderr
        self._quiet = quiet
        self._prefix = prefix

    def _print(self, text: str, end: str = "\n", *, continued: bool = False) -> None:
        if not self._quiet:
            prefix = "" if continued else self._prefix
            print(f"{prefix}{text}", end=end, file=self._out, flush=True)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time one step and report it; a failing step is reported as FAILED."""
        self.done += 1
        self._print(f"[{self.done}/{self.total}] {name} ...", end=" ")
        start = time.monotonic()
        try:
            yield
        except BaseException:
            self._print("FAILED", continued=True)
            raise
        self._print(f"done ({time.monotonic() - start:.1f} s)", continued=True)

    def note(self, text: str) -> None:
        self._print(text)
