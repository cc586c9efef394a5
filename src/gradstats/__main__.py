"""``python -m gradstats``: the command line."""

from gradstats.cli import main

raise SystemExit(main())
