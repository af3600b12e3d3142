"""``python -m mergebench.cli``: the ``mergebench`` command."""

import sys

from mergebench.cli import main

sys.exit(main())
