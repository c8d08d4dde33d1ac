"""``python -m blindnet <job> ...``: the same as the ``blindnet`` command."""

from blindnet.cli import main

raise SystemExit(main())
