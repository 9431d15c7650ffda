"""A minimal engine, as conmon is to podman (for tests that say so): a child
subreaper that runs ``vmfactory-oci create`` with its stdout and stderr on
files, then waits for the pid written to --pid-file (which create's exit leaves
to us) and records its exit code.

    python tests/oci/engine.py DIR -- OCI_ARGV... create --pid-file DIR/pid ID

Writes DIR/create.json ({"rc": N}) once create returned and DIR/exit
(the container's exit code as the pid's wait status says) when it ended.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36


def main() -> int:
    out, argv = Path(sys.argv[1]), sys.argv[3:]
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    with open(out / "stdout", "wb") as stdout, open(out / "stderr", "wb") as stderr:
        # As conmon's pipes: create's stdio is the container's (its errors land there too).
        create = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                timeout=600)
    (out / "create.json").write_text(json.dumps({"rc": create.returncode}))
    if create.returncode != 0:
        return 0
    pid = int((out / "pid").read_text())
    while True:
        try:
            waited, status = os.waitpid(-1, 0)
        except ChildProcessError:
            (out / "exit").write_text("lost")
            return 1
        if waited == pid:
            code = os.waitstatus_to_exitcode(status)
            (out / "exit").write_text(str(code if code >= 0 else 128 - code))
            return 0


if __name__ == "__main__":
    sys.exit(main())
