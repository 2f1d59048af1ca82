"""What the commands share: the settings of one invocation, kept on the click context.

The ``main`` group puts a :class:`CliState` on the context (``ctx.obj``). It reads the settings
(and sets up logging from them) the first time a command asks, and at most once; a command that
never asks (``--help``, ``models build``, ``demo``) reads no settings and opens no database.

A command asks through a decorator, which passes the settings as its first argument::

    @main.command()
    @pass_settings  # the settings only (`worker`, `flower`, `db upgrade`, ...)
    def worker(settings: Settings, ...) -> None: ...

    @main.command()
    @needs_schema  # the settings, with the embedded database created or upgraded first
    def status(settings: Settings, ...) -> None: ...

or, where something must be checked before the settings are read, by calling
:func:`current_settings` in its body.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

import click

from flickd.core.settings import Settings

P = ParamSpec("P")
R = TypeVar("R")


# Commands that run as services log at FLICKD_LOG_LEVEL (INFO by default). Every other command
# prints its own progress and summary; what the libraries and the pipeline log goes to the log
# only at WARNING, unless FLICKD_LOG_LEVEL is set.
SERVICES = frozenset({"worker", "scheduler", "api", "flower", "metrics"})


def configured_settings(service: bool = True) -> Settings:
    """The process's settings, with logging set up from them (what every command starts with)."""
    from flickd.core.logs import setup_logging
    from flickd.core.settings import get_settings

    settings = get_settings()
    chosen = "log_level" in settings.model_fields_set
    level = settings.log_level if service or chosen else "WARNING"
    setup_logging(level, settings.log_format, embedded=settings.embedded)
    return settings


class CliState:
    """One invocation's settings, read on first use; the schema, ensured on first use."""

    def __init__(self, debug: bool = False) -> None:
        self._settings: Settings | None = None
        self._schema_ensured = False
        self.debug = debug  # --debug: tracebacks instead of one-line errors

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            ctx = click.get_current_context(silent=True)
            name = ctx.command.name if ctx is not None else None
            self._settings = configured_settings(service=name in SERVICES)
        return self._settings

    def schema_settings(self) -> Settings:
        """The settings, after creating or upgrading the embedded (SQLite) database; a shared
        Postgres is left to ``flickd db upgrade`` (see ``db.migrate.ensure_schema``)."""
        settings = self.settings
        if not self._schema_ensured:
            from db.migrate import ensure_schema

            ensure_schema(settings)
            require_schema_at_head(settings)
            self._schema_ensured = True
        return settings


def require_schema_at_head(settings: Settings) -> None:
    """A shared database must have been upgraded (`flickd db upgrade`): say so in one line
    instead of failing later on a missing table or column."""
    from db.migrate import current_revision, head_revision
    from flickd.cli.errors import config_error

    current, head = current_revision(settings), head_revision()
    if current != head:
        where = "has no flickd schema" if current is None else f"is at revision {current}"
        raise config_error(
            f"the database {where}; this flickd needs {head}: run `flickd db upgrade`"
        )


def cli_state() -> CliState:
    """The state of the running invocation (created here if a command runs without ``main``)."""
    return click.get_current_context().ensure_object(CliState)


def current_settings(schema: bool = False) -> Settings:
    """The settings of the running command; with ``schema``, the database schema ensured."""
    state = cli_state()
    return state.schema_settings() if schema else state.settings


def pass_settings(command: Callable[Concatenate[Settings, P], R]) -> Callable[P, R]:
    """Call the command with the settings as its first argument."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        return command(current_settings(), *args, **kwargs)

    return wrapper


def needs_schema(command: Callable[Concatenate[Settings, P], R]) -> Callable[P, R]:
    """Call the command with the settings as its first argument, the schema ensured."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        return command(current_settings(schema=True), *args, **kwargs)

    return wrapper


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))
