"""``python -m first_hop_proxy``: the same as the ``first-hop-proxy`` command."""

import sys

from .cli import main

sys.exit(main())
