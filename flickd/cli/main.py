"""The ``flickd`` command line: the ``main`` group, with the commands of each topic module.

A topic module defines its commands with ``@click.command()`` (or a ``@click.group()``), takes
its settings through ``flickd.cli.context`` and has ``register(main)`` add them; a new module is
one more entry in ``COMMAND_MODULES``.
"""

from __future__ import annotations

import click

from flickd.cli import demo, durable, ingest, ops, runs, search, training
from flickd.cli.context import CliState
from flickd.cli.errors import FlickdGroup

COMMAND_MODULES = (ingest, runs, search, training, ops, durable, demo)


@click.group(cls=FlickdGroup)
@click.version_option(package_name="flickd")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """flickd: catalog feeds in, searchable visual index out.

    Exit codes: 0 done, 1 failed, 2 usage error, 3 configuration error, 4 a service is
    unreachable."""
    # The settings are read (and logging set up) when a command first asks for them: a command
    # that needs none (`--help`, `models build`, `demo`) reads none and opens no database.
    ctx.ensure_object(CliState).debug = debug


for _module in COMMAND_MODULES:
    _module.register(main)


if __name__ == "__main__":
    main()
