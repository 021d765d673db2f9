"""Subcommands of the `karcher-lab` CLI, one module each (see karcher_lab/cli.py)."""
