"""``python -m runtime_client``: the vmfactory-runtime command line."""

import sys

from runtime_client.cli import main

sys.exit(main())
