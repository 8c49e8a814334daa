"""``python -m miprun.cli``: the same as the ``miprun`` command."""

from miprun.cli import main

raise SystemExit(main())
