"""python -m ring_ext demo | bench: see ring_ext/cli.py."""

from .cli import main

main()
