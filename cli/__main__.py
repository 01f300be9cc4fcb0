"""``python -m nemoforge_cli``: the ``nemoforge`` command line."""

import sys

from nemoforge_cli.main import main

sys.exit(main())
