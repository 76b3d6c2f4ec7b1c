"""Errors that the CLI shows to users as one line, without a traceback."""


class TbquantError(Exception):
    """A failure caused by user input or the environment: bad paths, options, data or models.

    The message names the offending value and the fix. The CLI prints it as one line and exits
    with status 2 (`exit_code`); library callers can catch it like any exception.
    """

    exit_code = 2


class DataError(TbquantError):
    """A data file that is missing, empty, not UTF-8, malformed, or lacks the needed columns."""


class ModelLoadError(TbquantError):
    """A model that cannot be found or read: missing path, uncached hub id, corrupt weights."""


class ExportError(TbquantError):
    """An export that cannot be written or read back."""


class HubError(TbquantError):
    """A Hub upload that cannot start or failed: invalid repository id, missing or rejected token,
    missing permission, server error or unreachable endpoint."""
