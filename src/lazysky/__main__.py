"""``python -m lazysky`` is the ``lazysky`` command."""

from lazysky.cli import main

raise SystemExit(main())
