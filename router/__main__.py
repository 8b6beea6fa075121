"""``python -m router``: start the router (same as ``disagg router``)."""

import sys

from router.launch import main

sys.exit(main())
