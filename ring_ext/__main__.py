"""python -m ring_ext demo | bench | plan: see ring_ext/cli.py."""

from .cli import main

main()
