"""Signal names as the runtimes' command lines take them (standard library only:
the OCI front end imports it)."""

from __future__ import annotations

import signal


def signal_number(value: str) -> int:
    """runc's and docker's forms: 9, KILL, SIGKILL (any case); ValueError with the
    caller's one line otherwise."""
    name = value.upper()
    if name.isdigit():
        number = int(name)
    else:
        try:
            number = signal.Signals[name if name.startswith("SIG") else "SIG" + name].value
        except KeyError:
            raise ValueError(f"unknown signal {value[:40]!r}") from None
    if not 0 < number < signal.NSIG:
        raise ValueError(f"signal {value[:40]!r} is out of range")
    return number
