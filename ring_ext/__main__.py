"""python -m ring_ext demo | bench | plan: see ring_ext/tools/cli.py."""

from .tools.cli import main

main()
