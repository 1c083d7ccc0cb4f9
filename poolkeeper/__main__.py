"""``python -m poolkeeper``: the command line."""

from poolkeeper.cli import main

raise SystemExit(main())
