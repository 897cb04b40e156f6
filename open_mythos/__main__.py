"""``python -m open_mythos ...`` runs the ``openmythos`` command (works under ``torchrun -m``)."""

from .cli import main

raise SystemExit(main())
