"""``python -m vramferry``: the same as the ``vramferry`` command."""

from .cli import main

raise SystemExit(main())
