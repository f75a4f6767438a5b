"""``python -m grng verify`` / ``python -m grng bench``: see :mod:`grng.cli`."""
from __future__ import annotations

import sys

from grng.cli import main

sys.exit(main())
