"""``python -m runtime_client.shims``: the standalone shim process of ``katashim``."""

import sys

from runtime_client.shims.process import main

sys.exit(main())
