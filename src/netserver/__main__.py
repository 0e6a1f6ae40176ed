"""``python -m netserver``: the ``netserver`` command, for when the script is not on PATH.

``cli.main`` moves the current directory (which ``python -m`` puts first on
``sys.path``) to the end before it imports anything lazily, so a module planted there
never shadows an installed one.
"""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
