"""``python -m fileserver`` runs the command line."""

from __future__ import annotations

import sys

from fileserver.cli import main

sys.exit(main())
