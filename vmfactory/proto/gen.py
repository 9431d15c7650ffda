"""Generate the Python modules for every .proto in this package.

Run as ``python -m vmfactory.proto.gen``.  Regenerates only when a .proto file
changed (a stamp file records their hash), so running it twice is cheap.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

PROTO_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTO_DIR.parent.parent
STAMP = PROTO_DIR / ".stamp"


def _proto_files() -> list[Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def _digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def generate(force: bool = False) -> bool:
    """Generate the modules if stale; return True if protoc ran."""
    from grpc_tools import protoc

    files = _proto_files()
    digest = _digest(files)
    if not force and STAMP.exists() and STAMP.read_text() == digest:
        return False
    import grpc_tools

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    for f in files:
        rel = f.relative_to(REPO_ROOT)
        args = ["protoc", f"-I{REPO_ROOT}", f"-I{include}", f"--python_out={REPO_ROOT}",
                f"--pyi_out={REPO_ROOT}", f"--grpc_python_out={REPO_ROOT}", str(rel)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed for {rel}")
    STAMP.write_text(digest)
    logger.info("generated Python modules for %d proto files", len(files))
    return True


def main() -> int:
    ran = generate(force="--force" in sys.argv)
    print("proto: generated" if ran else "proto: up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
