"""One place where failures become what the user sees: one line, no traceback."""

from __future__ import annotations

import logging
import sys

import click
from rich.console import Console

from tbquant.errors import TbquantError

error_console = Console(stderr=True, highlight=False, soft_wrap=True)


def report(message: str) -> None:
    error_console.print(f"[bold red]Error:[/] {message}", markup=True, emoji=False)


def run_cli(app) -> int:
    """Run the Typer `app` and turn failures into one-line messages and exit codes.

    Exit codes: 0 success, 1 unexpected failure, 2 bad input (usage or `TbquantError`),
    130 interrupted. `--verbose` anywhere on the command line shows the traceback of failures.
    """
    verbose = "--verbose" in sys.argv or "-v" in sys.argv[1:]
    try:
        app(standalone_mode=False)
    except click.exceptions.Exit as exit_:
        return exit_.exit_code
    except click.UsageError as error:
        hint = f" (see: tbquant {error.ctx.command_path.split(' ', 1)[1]} --help)" if error.ctx and " " in error.ctx.command_path else " (see: tbquant --help)"
        report(error.format_message().replace("\n", " ") + hint)
        return 2
    except click.ClickException as error:
        report(error.format_message())
        return error.exit_code
    except (KeyboardInterrupt, click.exceptions.Abort):
        report("interrupted")
        return 130
    except TbquantError as error:
        if verbose:
            logging.getLogger("tbquant").exception("failure")
        report(str(error))
        return error.exit_code
    except Exception as error:  # an unexpected failure is a bug: say so, and show it on request
        if verbose:
            error_console.print_exception()
        report(f"{type(error).__name__}: {error} (this is a bug in tbquant; rerun with --verbose for the traceback)")
        return 1
    return 0
