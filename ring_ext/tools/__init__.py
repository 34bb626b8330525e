"""Tools built on the library: the command line (cli) and the planner; nothing in ring_ext imports them."""
