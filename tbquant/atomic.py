"""Crash-safe replacement of an output directory.

A directory is written under a hidden staging name next to its destination, flushed to disk
with fsync, and renamed into place. An existing destination is first renamed aside and deleted
only after the new directory is in place. A kill at any moment therefore leaves the previous
directory or the new one at the destination. For the instant between the two renames, the
previous one sits under its aside name. `recover_interrupted` restores or deletes what an
interrupted run left behind; the export stage calls it before it writes.

Sibling names, for a destination `out`:

- `.out.tbquant-tmp-<pid>-<random>`: a staging directory being written by process `<pid>`;
- `.out.tbquant-old-<pid>`: the previous `out`, renamed aside by process `<pid>`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from tbquant.errors import ExportError, TbquantError

logger = logging.getLogger(__name__)

STAGING_MARKER = ".tbquant-tmp-"
BACKUP_MARKER = ".tbquant-old-"


def fsync_file(path: Path) -> None:
    """Flush the contents of the file at `path` to disk."""
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def fsync_directory(path: Path) -> None:
    """Flush the entries of the directory at `path` (creations, renames) to disk.

    NOTE: Windows cannot open a directory for fsync; there the call does nothing.
    """
    if os.name == "nt":
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(directory: Path) -> None:
    """Flush every file below `directory`, then the directories themselves, to disk."""
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            fsync_file(path)
    for path in sorted((path for path in directory.rglob("*") if path.is_dir()), reverse=True):
        fsync_directory(path)
    fsync_directory(directory)


def make_staging_directory(output: Path) -> Path:
    """Create an empty staging directory next to `output`, named after it and this process."""
    parent = output.resolve().parent
    return Path(tempfile.mkdtemp(prefix=f".{output.name}{STAGING_MARKER}{os.getpid()}-", dir=parent))


def backup_path(output: Path) -> Path:
    """Return the name under which this process keeps the previous `output` during a replace."""
    return output.with_name(f".{output.name}{BACKUP_MARKER}{os.getpid()}")


def replace_directory(staging: Path, output: Path) -> None:
    """Move the complete directory `staging` to `output`, replacing an existing `output`.

    The previous `output` is renamed aside, the staging directory renamed in, and only then is
    the previous one deleted. If the second rename fails, the previous `output` is renamed back
    before the error propagates.
    """
    parent = output.resolve().parent
    backup = None
    if output.exists():
        backup = backup_path(output)
        os.rename(output, backup)
    try:
        os.rename(staging, output)
    except OSError:
        if backup is not None:
            os.rename(backup, output)
        raise
    fsync_directory(parent)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def _owner_pid(name: str, prefix: str) -> int | None:
    match = re.match(r"(\d+)", name[len(prefix):])
    return int(match.group(1)) if match else None


def _is_running(pid: int) -> bool:
    # NOTE: a process id reused by an unrelated process makes a stale directory look live; it
    # is then left in place, which loses nothing.
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_interrupted(output: Path) -> None:
    """Clean up after a run that was killed while writing `output`.

    Staging directories of dead processes are deleted. The previous `output`, renamed aside by
    a dead process, is renamed back when `output` is missing (the run died between its two
    renames) and deleted otherwise (the new `output` was already in place). Directories of
    running processes are left alone.
    """
    parent = output.resolve().parent
    if not parent.is_dir():
        return
    staging_prefix = f".{output.name}{STAGING_MARKER}"
    backup_prefix = f".{output.name}{BACKUP_MARKER}"
    for path in sorted(parent.iterdir()):
        if path.name.startswith(staging_prefix):
            pid = _owner_pid(path.name, staging_prefix)
            if pid is not None and not _is_running(pid):
                logger.info("Deleting %s, left by an interrupted export", path)
                shutil.rmtree(path, ignore_errors=True)
        elif path.name.startswith(backup_prefix):
            pid = _owner_pid(path.name, backup_prefix)
            if pid is None or _is_running(pid):
                continue
            if not output.exists():
                logger.warning("Restoring %s from %s, where an interrupted export left it", output, path)
                os.rename(path, output)
                fsync_directory(parent)
            else:
                logger.info("Deleting %s, the previous export that an interrupted run replaced", path)
                shutil.rmtree(path, ignore_errors=True)


def check_free_space(directory: Path, needed_bytes: int, action: str, fix: str, error: type[TbquantError] = ExportError) -> None:
    """Raise `error` if the file system of `directory` has less than `needed_bytes` free.

    `action` names the write ("the export to out") and `fix` the remedy, in the message.
    """
    free = shutil.disk_usage(directory).free
    if free < needed_bytes:
        raise error(
            f"not enough disk space in {directory} for {action}: it needs about {needed_bytes / 1e6:.1f} MB "
            f"and {free / 1e6:.1f} MB is free: {fix}"
        )
