"""The command line (top layer): ``flickd`` and its subcommands, and the demo."""

from flickd.cli.main import main

__all__ = ["main"]
