"""Formatting of command-line failures: one line on stderr, no traceback."""

from __future__ import annotations

import logging
import sys

import typer

from tbquant.cli._compat import exceptions
from tbquant.cli._terminal import make_console
from tbquant.errors import TbquantError

# Raised after the help text when a command runs without arguments (click 8.2 and later).
_NO_ARGS_IS_HELP = getattr(exceptions, "NoArgsIsHelpError", ())

error_console = make_console(stderr=True, highlight=False, soft_wrap=True)


def report(message: str) -> None:
    error_console.print(f"[bold red]Error:[/] {message}", markup=True, emoji=False)


def _rejected_value(error: Exception) -> object | None:
    """Return the command-line value that Typer's type conversion rejected, if it recorded one.

    Typer converts values with pydantic and chains the `ValidationError`, whose `errors()` hold
    the input; its own message leaves the value out.
    """
    errors = getattr(error.__cause__, "errors", None)
    if not callable(errors):
        return None
    details = errors()
    return details[0].get("input") if details else None


def run_cli(app) -> int:
    """Run the Typer `app` and turn failures into one-line messages and exit codes.

    Exit codes: 0 success, 1 unexpected failure, 2 bad input (usage or `TbquantError`),
    130 interrupted. `--verbose` anywhere on the command line shows the traceback of failures.
    """
    verbose = "--verbose" in sys.argv or "-v" in sys.argv[1:]
    try:
        # Typer turns Ctrl-C into an exit code of 130, which it returns instead of raising.
        code = app(prog_name="tbquant", standalone_mode=False)
        if code == 130:
            report("interrupted")
        return code if isinstance(code, int) else 0
    except typer.Exit as exit_:
        return exit_.exit_code
    except _NO_ARGS_IS_HELP:
        return 0
    except exceptions.UsageError as error:
        hint = f" (see: tbquant {error.ctx.command_path.split(' ', 1)[1]} --help)" if error.ctx and " " in error.ctx.command_path else " (see: tbquant --help)"
        message = error.format_message().replace("\n", " ")
        value = _rejected_value(error)
        if value is not None:
            message = message.replace("Invalid value for", f"Invalid value {value!r} for", 1)
        report(message + hint)
        return 2
    except exceptions.ClickException as error:
        report(error.format_message())
        return error.exit_code
    except (KeyboardInterrupt, typer.Abort):
        report("interrupted")
        return 130
    except TbquantError as error:
        if verbose:
            logging.getLogger("tbquant").exception("failure")
        report(str(error))
        return error.exit_code
    except Exception as error:  # An unexpected failure is a bug, reported as such, with its traceback under --verbose.
        if verbose:
            error_console.print_exception()
        report(f"{type(error).__name__}: {error} (this is a bug in tbquant; rerun with --verbose for the traceback)")
        return 1
    return 0
