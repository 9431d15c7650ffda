"""Unix socket files: is anyone serving this one?"""

from __future__ import annotations

import socket
from pathlib import Path

PROBE_TIMEOUT_S = 0.5


def socket_accepts(path: Path | str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether some process accepts connections on the unix socket ``path`` now.

    Refused or missing means nobody serves it (a stale file, safe to remove);
    any other failure (a full backlog, a socket we may not use) counts as
    served, because then it is not ours to remove."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(timeout)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError, NotADirectoryError):
            return False
        except OSError:
            return True
        return True
