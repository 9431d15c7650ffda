"""``python -m runtime_client.proxies``: the standalone proxy process."""

import sys

from runtime_client.proxies.process import main

sys.exit(main())
