"""``python -m weightcache.demo worker REF``: what the demo's worker processes run."""

import sys

from weightcache.demo.processes import main

raise SystemExit(main(sys.argv[1:]))
