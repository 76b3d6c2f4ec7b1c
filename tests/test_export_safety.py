"""Crash safety of the export: SIGKILL at each write step, a full disk, failed writes.

The kill tests fork the test process after the model is packed. The child runs the real export
stage with one step wrapped to send itself SIGKILL. Nothing after that point runs (no `finally`,
no cleanup), as when the machine or the user kills a real run.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import signal
import sys
import textwrap
from collections import namedtuple
from pathlib import Path

import pytest
from support import packed_state, run_cli, write_training_data

import tbquant.atomic
import tbquant.stages.export
from tbquant.atomic import BACKUP_MARKER, STAGING_MARKER, recover_interrupted
from tbquant.errors import ExportError
from tbquant.integrity import verify_export
from tbquant.stages.export import ExportStage


def file_contents(folder: Path) -> dict[str, bytes]:
    """Return the bytes of every file below `folder`, by relative path."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def leftovers(parent: Path) -> list[str]:
    """Return the staging and backup directories in `parent`."""
    return sorted(path.name for path in parent.iterdir() if STAGING_MARKER in path.name or BACKUP_MARKER in path.name)


@pytest.fixture(scope="module")
def llama_files(tiny_model, tmp_path_factory) -> tuple[Path, Path, Path]:
    model_dir = tiny_model("llama")
    train, valid = write_training_data(tmp_path_factory.mktemp("export-safety-data"), model_dir, "causal-lm")
    return model_dir, train, valid


@pytest.fixture(scope="module")
def state(llama_files, tmp_path_factory):
    """A packed tiny Llama, exported by each test to its own output."""
    model_dir, train, valid = llama_files
    return packed_state(model_dir, train, valid, tmp_path_factory.mktemp("unused") / "export")


def export_to(state, output: Path, overwrite: bool = True) -> None:
    state.settings = dataclasses.replace(state.settings, output=output, overwrite=overwrite)
    ExportStage().run(state)


@pytest.fixture
def previous_export(state, tmp_path) -> tuple[Path, dict[str, bytes]]:
    """Export once to `tmp_path/export` and add a user's file; returns the output and its bytes."""
    output = tmp_path / "export"
    export_to(state, output)
    (output / "notes.txt").write_text("the user's notes", encoding="utf-8")
    return output, file_contents(output)


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _after(function, action=_kill_self):
    def wrapper(*args, **kwargs):
        result = function(*args, **kwargs)
        action()
        return result

    return wrapper


def _half_weights_then_kill(save_weights):
    def wrapper(tensors, path):
        save_weights(tensors, path)
        with path.open("r+b") as handle:
            handle.truncate(path.stat().st_size // 2)
        _kill_self()

    return wrapper


def _rename_then_kill(marker: str, side: str):
    """Wrap `os.rename` to kill the process after a rename whose source (`side="src"`) or
    destination (`side="dst"`) name contains `marker`."""
    rename = os.rename

    def wrapper(source, destination, *args, **kwargs):
        rename(source, destination, *args, **kwargs)
        name = Path(source if side == "src" else destination).name
        if marker in name:
            _kill_self()

    return wrapper


def _rmtree_partly_then_kill(path, *args, **kwargs):
    if BACKUP_MARKER in Path(path).name:
        next(path for path in Path(path).iterdir() if path.is_file()).unlink()
        _kill_self()
    shutil.rmtree(path, *args, **kwargs)


# Named points in the export and the patch that kills the process there. Points up to "aside"
# come before the new export is in place; the others after.
KILL_POINTS = {
    "weights-half-written": lambda: setattr(
        tbquant.stages.export, "save_weights", _half_weights_then_kill(tbquant.stages.export.save_weights)
    ),
    "config-written": lambda: setattr(tbquant.stages.export, "_save_config", _after(tbquant.stages.export._save_config)),
    "all-files-written": lambda: setattr(tbquant.stages.export, "fsync_tree", lambda directory: _kill_self()),
    "fsynced": lambda: setattr(tbquant.stages.export, "fsync_tree", _after(tbquant.stages.export.fsync_tree)),
    "aside": lambda: setattr(os, "rename", _rename_then_kill(BACKUP_MARKER, "dst")),
    "moved-in": lambda: setattr(os, "rename", _rename_then_kill(STAGING_MARKER, "src")),
    "deleting-previous": lambda: setattr(tbquant.atomic.shutil, "rmtree", _rmtree_partly_then_kill),
}
BEFORE_SWAP = ("weights-half-written", "config-written", "all-files-written", "fsynced", "aside")


def export_killed_at(state, output: Path, point: str) -> int:
    """Run the export in a forked child that SIGKILLs itself at `point`; returns the signal."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns to pytest
        try:
            KILL_POINTS[point]()
            export_to(state, output)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_keeps_previous_export(state, previous_export, point):
    output, before = previous_export

    killed_by = export_killed_at(state, output, point)

    assert killed_by == signal.SIGKILL
    if point in BEFORE_SWAP and point != "aside":
        assert file_contents(output) == before

    recover_interrupted(output)

    assert leftovers(output.parent) == []
    if point in BEFORE_SWAP:
        assert file_contents(output) == before
    else:
        assert "notes.txt" not in file_contents(output)
        verify_export(output)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_kill_leaves_only_hidden_staging(state, tmp_path):
    output = tmp_path / "export"

    export_killed_at(state, output, "config-written")

    names = leftovers(tmp_path)
    assert not output.exists()
    assert len(names) == 1
    assert names[0].startswith(f".export{STAGING_MARKER}")


def test_next_export_cleans_stale_staging(state, tmp_path):
    output = tmp_path / "export"
    stale = tmp_path / f".export{STAGING_MARKER}999999999-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")

    export_to(state, output, overwrite=False)

    assert leftovers(tmp_path) == []
    verify_export(output)


def test_live_staging_is_kept(tmp_path):
    live = tmp_path / f".export{STAGING_MARKER}{os.getppid()}-abc"
    live.mkdir()

    recover_interrupted(tmp_path / "export")

    assert live.is_dir()


def test_recover_restores_previous_export(tmp_path):
    backup = tmp_path / f".export{BACKUP_MARKER}999999999"
    backup.mkdir()
    (backup / "config.json").write_text("{}", encoding="utf-8")

    recover_interrupted(tmp_path / "export")

    assert (tmp_path / "export" / "config.json").read_text(encoding="utf-8") == "{}"
    assert leftovers(tmp_path) == []


def test_cli_kill_then_rerun_restores(llama_files, tmp_path):
    """Kill the real CLI between its two renames; the next command restores the previous export."""
    model_dir, train, valid = llama_files
    output = tmp_path / "export"
    output.mkdir()
    (output / "notes.txt").write_text("the user's notes", encoding="utf-8")
    before = file_contents(output)
    harness = textwrap.dedent(
        f"""
        import os, signal, sys
        from pathlib import Path
        rename = os.rename
        def rename_then_kill(source, destination, *args, **kwargs):
            rename(source, destination, *args, **kwargs)
            if {BACKUP_MARKER!r} in Path(destination).name:
                os.kill(os.getpid(), signal.SIGKILL)
        os.rename = rename_then_kill
        sys.argv = ["tbquant"] + sys.argv[1:]
        from tbquant.cli.main import main
        main()
        """
    )
    arguments = [str(model_dir), "--output", str(output), "--data", str(train), "--eval-data", str(valid)]
    arguments += ["--steps", "0", "--max-length", "32", "--batch-size", "2", "--calibration-batches", "1", "--eval-batches", "1"]
    killed = run_cli_script(harness, "compress", *arguments, "--overwrite")

    assert killed.returncode == -signal.SIGKILL
    assert not output.exists()

    rerun = run_cli("compress", *arguments, cwd=tmp_path)

    assert rerun.returncode == 2
    assert "exists and is not empty" in rerun.stderr
    assert file_contents(output) == before
    assert leftovers(tmp_path) == []


def run_cli_script(script: str, *args: str):
    import subprocess

    environment = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=environment, timeout=300, check=False)


# Disk space and failed writes


DiskUsage = namedtuple("DiskUsage", "total used free")


def test_full_disk_fails_before_writing(state, previous_export, monkeypatch):
    output, before = previous_export
    monkeypatch.setattr(tbquant.atomic.shutil, "disk_usage", lambda path: DiskUsage(10**9, 10**9 - 1000, 1000))

    with pytest.raises(ExportError, match="not enough disk space") as raised:
        export_to(state, output)

    assert "MB is free" in str(raised.value)
    assert "\n" not in str(raised.value)
    assert file_contents(output) == before
    assert leftovers(output.parent) == []


@pytest.mark.parametrize("step", ["save_weights", "write_json", "fsync_tree"])
def test_failed_write_cleans_up(state, previous_export, monkeypatch, step):
    output, before = previous_export
    original = getattr(tbquant.stages.export, step)

    def write_then_fail(*args, **kwargs):
        original(*args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tbquant.stages.export, step, write_then_fail)

    with pytest.raises(ExportError) as raised:
        export_to(state, output)

    message = str(raised.value)
    assert message.startswith(f"writing the export to {output} failed: No space left on device")
    assert "left as it was" in message
    assert "\n" not in message
    assert file_contents(output) == before
    assert leftovers(output.parent) == []


def test_failed_rename_restores_previous(state, previous_export, monkeypatch):
    output, before = previous_export
    rename = os.rename

    def fail_staging_rename(source, destination, *args, **kwargs):
        if STAGING_MARKER in Path(source).name:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        rename(source, destination, *args, **kwargs)

    monkeypatch.setattr(os, "rename", fail_staging_rename)

    with pytest.raises(ExportError, match="Input/output error"):
        export_to(state, output)

    assert file_contents(output) == before
    assert leftovers(output.parent) == []
