"""Command modules of the ``openmythos`` CLI; each exposes ``add_parser(subparsers)``."""
