"""Output settings that depend on whether stdout and stderr are terminals: console width and
progress bars.

On a terminal, rich and typer size their output to the terminal and progress bars redraw one
line. When no standard stream is a terminal (a script or CI job writing to a file), rich uses 80
columns, which cuts table cells and wraps help text, and a log receives every update of a
progress bar. So output that is not a terminal gets `WIDE_COLUMNS` columns (unless `COLUMNS` or
typer's `TERMINAL_WIDTH` sets a width) and no progress bars from transformers or
huggingface_hub.
"""

from __future__ import annotations

import os
import sys
from typing import IO, Any

from rich.console import Console

# Width of rich output that is not a terminal. The table of `tbquant inspect` on SmolLM2 takes 102
# columns.
WIDE_COLUMNS = 200


def is_terminal(stream: IO | None) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(callable(isatty) and isatty())


def output_width(stream: IO | None) -> int | None:
    """Return the width for rich output to `stream`: None (rich's own choice) when `COLUMNS` is
    set or `stream` is a terminal, else `WIDE_COLUMNS`."""
    if os.environ.get("COLUMNS", "").isdigit() or is_terminal(stream):
        return None
    return WIDE_COLUMNS


def make_console(stderr: bool = False, **options: Any) -> Console:
    """Create a rich Console for stdout (or stderr) with the width of `output_width`.

    The width is chosen when the console is created, so create consoles in the process that
    writes with them.
    """
    return Console(stderr=stderr, width=output_width(sys.stderr if stderr else sys.stdout), **options)


def set_help_width() -> None:
    """Give typer's help output `WIDE_COLUMNS` columns when stdout is not a terminal.

    NOTE: typer (checked with 0.29) reads its width from the module global `MAX_WIDTH`. Typer
    sets it from the `TERMINAL_WIDTH` variable at import, and a width set there is kept.
    """
    from typer import rich_utils

    if rich_utils.MAX_WIDTH is None:
        rich_utils.MAX_WIDTH = output_width(sys.stdout)


def configure_progress_bars(show: bool) -> None:
    """Show or hide the progress bars of transformers and huggingface_hub.

    A `HF_HUB_DISABLE_PROGRESS_BARS` variable set to 0 or 1 overrides `show`, as it does in both
    libraries. Showing the bars enables transformers' and leaves huggingface_hub's as they are.
    """
    import huggingface_hub.utils
    from huggingface_hub import constants
    from transformers import modeling_gguf_pytorch_utils
    from transformers.utils import logging as transformers_logging

    if constants.HF_HUB_DISABLE_PROGRESS_BARS is not None:
        show = not constants.HF_HUB_DISABLE_PROGRESS_BARS

    # NOTE: transformers (checked with 5.25) de-quantizes GGUF tensors under a plain tqdm bar,
    # which disable_progress_bar() does not reach. Its own tqdm wrapper follows that switch.
    modeling_gguf_pytorch_utils.tqdm = transformers_logging.tqdm
    if show:
        transformers_logging.enable_progress_bar()
    else:
        transformers_logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()
