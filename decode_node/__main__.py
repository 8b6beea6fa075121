"""``python -m decode_node``: start a decode node (same as ``disagg decode-node``)."""

import sys

from disagg.node.launch import main

sys.exit(main("decode"))
