"""``python -m prefill_node``: start a prefill node (same as ``disagg prefill-node``)."""

import sys

from disagg.node.launch import main

sys.exit(main("prefill"))
