"""``python -m synthetic.catalog OUT_DIR --products N ...``: see :mod:`synthetic.catalog.cli`."""

import sys

from synthetic.catalog.cli import main

sys.exit(main())
