"""The proxy's socket file: checked, and a stale one removed, before it is bound."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from runtime_client.errors import ProxyError
from vmfactory.util.sockets import socket_accepts

logger = logging.getLogger(__name__)

# sun_path is 108 bytes, NUL included.
MAX_SOCKET_PATH = 107

def prepare_socket_path(path: Path) -> None:
    """Check ``path`` can hold our socket; remove a stale socket file left there."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ProxyError(f"socket path is longer than {MAX_SOCKET_PATH} bytes: {path}")
    # Checked here too so the common mistakes get a plain message, not asyncio's exceptions.
    if not path.parent.is_dir():
        raise ProxyError(f"cannot serve {path}: no directory {path.parent}")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ProxyError(f"cannot serve {path}: {path.parent} is not writable")
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ProxyError(f"cannot use {path}: {exc}") from exc
    if not stat.S_ISSOCK(mode):
        raise ProxyError(f"{path} exists and is not a socket")
    if socket_accepts(path):
        raise ProxyError(f"{path} is already served by another process")
    logger.info("removing stale socket %s", path)
    path.unlink(missing_ok=True)
