"""OCI runtime-spec bundles: ``loading`` reads and validates ``config.json``,
``executables`` finds the program inside the bundle's root, ``images`` packs
the root into a cached read-only ext4 image for the guest, ``busybox`` makes
bundles from the host's static busybox (the demo's and the tests')."""

from runtime_client.bundles.executables import find_executable, resolve_in_root
from runtime_client.bundles.images import ImageCache
from runtime_client.bundles.loading import (
    DEFAULT_PATH, Bundle, ProcessSpec, User, load_bundle,
    parse_process,
)

__all__ = ["DEFAULT_PATH", "Bundle", "ImageCache", "ProcessSpec", "User", "find_executable",
           "load_bundle", "parse_process", "resolve_in_root"]
