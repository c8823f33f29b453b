"""``python -m bgsave``: the ``bgsave`` command (see :mod:`bgsave.cli`)."""

from bgsave.cli import main

raise SystemExit(main())
