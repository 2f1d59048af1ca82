"""The ``flickd`` command line: the ``main`` group, with the commands of each topic module.

A topic module defines its commands with ``@click.command()`` (or a ``@click.group()``), takes
its settings through ``flickd.cli.context`` and has ``register(main)`` add them; a new module is
one more entry in ``COMMAND_MODULES``.
"""

from __future__ import annotations

import click

from flickd.cli import demo, durable, ingest, ops, runs, search, training
from flickd.cli.context import CliState

COMMAND_MODULES = (ingest, runs, search, training, ops, durable, demo)


@click.group()
@click.version_option(package_name="flickd")
@click.pass_context
def main(ctx: click.Context) -> None:
    """flickd: catalog feeds in, searchable visual index out."""
    # The settings are read (and logging set up) when a command first asks for them: a command
    # that needs none (`--help`, `models build`, `demo`) reads none and opens no database.
    ctx.ensure_object(CliState)


for _module in COMMAND_MODULES:
    _module.register(main)


if __name__ == "__main__":
    main()
