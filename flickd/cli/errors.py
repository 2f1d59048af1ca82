"""Mistakes of configuration and unreachable services, said in one line.

Every command runs inside :class:`FlickdGroup`, which turns the errors a first-hour user meets (a
database URL that is not one, a Postgres or Redis that does not answer, a database never
upgraded, a model directory that holds no model, a hub id offline) into one line that names the
setting, what is wrong and what to do, with a documented exit code. The traceback is shown
only with ``--debug`` or ``FLICKD_LOG_LEVEL=DEBUG``.

Exit codes: 0 done; 1 the operation failed (a bug, or what its message says); 2 usage (a wrong
option or argument: click's own); 3 configuration (fix a setting or run a set-up step); 4 a
service is unreachable (start it, or point the setting elsewhere).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import click

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_UNAVAILABLE = 4


class Problem(click.ClickException):
    """A one-line error: a configuration mistake (fix a setting, run a set-up step)."""

    exit_code = EXIT_CONFIG


class Unreachable(Problem):
    """A service that does not answer."""

    exit_code = EXIT_UNAVAILABLE


class Failure(Problem):
    """The operation failed for another reason (a bug, or what the message says)."""

    exit_code = EXIT_FAILED


def config_error(message: str) -> Problem:
    return Problem(message)


def unreachable(message: str) -> Problem:
    return Unreachable(message)


def redact(url: str | None) -> str:
    """``url`` without its password, for messages."""
    if not url:
        return ""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


def _first_line(error: BaseException) -> str:
    text = str(getattr(error, "orig", None) or error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def explain(error: BaseException) -> Problem | None:
    """The one-line explanation of ``error``, or None when it is none of the known mistakes."""
    from pydantic import ValidationError
    from sqlalchemy import exc as sa

    from models.loading import ModelLoadError

    if isinstance(error, Problem):
        return error
    if isinstance(error, ValidationError):
        return config_error(_settings_problem(error))
    if isinstance(error, sa.ArgumentError | sa.NoSuchModuleError):
        return config_error(
            f"FLICKD_DATABASE_URL is not a database URL ({_first_line(error)}): use "
            "postgresql://user@host:5432/name, or leave it unset for the embedded SQLite database"
        )
    if isinstance(error, sa.ProgrammingError) and "does not exist" in str(error):
        return config_error(
            "the database has no flickd schema (" + _first_line(error) + "): run "
            "`flickd db upgrade` against FLICKD_DATABASE_URL first"
        )
    if isinstance(error, sa.OperationalError):
        return _database_problem(error)
    broker = _broker_problem(error)
    if broker is not None:
        return broker
    if isinstance(error, ModelLoadError):
        return config_error(str(error))
    return None


def _settings_problem(error: Any) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item.get("loc", ()) if part != "__root__")
        name = f"FLICKD_{field.upper()}" if field else "the FLICKD_* settings"
        lines.append(f"{name}: {item.get('msg', 'invalid')}")
    return "; ".join(lines) + " (see the settings table in README.md)"


def _database_problem(error: BaseException) -> Problem:
    text = _first_line(error)
    missing = re.search(r'database "([^"]+)" does not exist', text)
    if missing:
        return config_error(
            f"FLICKD_DATABASE_URL names database {missing.group(1)!r}, which does not exist: "
            f"create it (createdb {missing.group(1)}) and run `flickd db upgrade`"
        )
    if "unable to open database file" in text:
        return config_error(
            f"cannot open the SQLite database ({text}): check that FLICKD_DATA_DIR is writable"
        )
    if re.search(r"authentication|password", text, re.I):
        return config_error(f"the database refused the login ({text}): fix FLICKD_DATABASE_URL")
    return unreachable(
        f"cannot reach the database ({text}): is Postgres running at FLICKD_DATABASE_URL? "
        "Start it, or fix the URL"
    )


def _broker_problem(error: BaseException) -> Problem | None:
    import kombu.exceptions
    import redis.exceptions

    if isinstance(error, redis.exceptions.AuthenticationError | redis.exceptions.ResponseError):
        return config_error(
            f"the broker refused the request ({_first_line(error)}): fix FLICKD_BROKER_URL"
        )
    if isinstance(
        error,
        redis.exceptions.ConnectionError
        | redis.exceptions.TimeoutError
        | kombu.exceptions.OperationalError,
    ):
        return unreachable(
            f"cannot reach the broker ({_first_line(error)}): is Redis running at "
            "FLICKD_BROKER_URL? Start it, or unset FLICKD_BROKER_URL for the embedded mode"
        )
    return None


class FlickdGroup(click.Group):
    """The ``flickd`` group: known mistakes become one line (see the module's docstring); any
    other error is a bug, said in one line too, with the way to see its traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as error:
            if _debug(ctx):
                raise
            problem = explain(error)
            if problem is not None:
                raise problem from None
            raise Failure(
                f"internal error: {type(error).__name__}: {_first_line(error)} "
                "(run with --debug for the traceback)"
            ) from None


def _debug(ctx: click.Context) -> bool:
    from flickd.core.settings import debug_requested

    # ctx.obj is the CliState that `main` made (flickd/cli/context.py; not imported: it uses
    # this module's errors).
    return bool(getattr(ctx.obj, "debug", False)) or debug_requested()
