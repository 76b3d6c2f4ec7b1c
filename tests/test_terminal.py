"""Output to terminals, files and pipes: width of help text and progress bars of transformers.

The subprocess tests give the child a pipe, or a pseudo-terminal from `pty`, as its real
stdout or stderr, because that is what the CLI decides on.
"""

from __future__ import annotations

import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios

import huggingface_hub.utils
import pytest
from huggingface_hub import constants
from support import run_cli
from transformers import modeling_gguf_pytorch_utils
from transformers.utils import logging as transformers_logging

from tbquant.cli._terminal import WIDE_COLUMNS, configure_progress_bars

NORMALIZE_HIDDEN_HELP = "Divide each layer's hidden-state MSE by the teacher's mean square."

# Runs the CLI's logging setup, then iterates under the bar that transformers' GGUF loader shows
# while it de-quantizes tensors.
GGUF_BAR_SCRIPT = """
from tbquant.cli.main import _setup_logging
from transformers import modeling_gguf_pytorch_utils

_setup_logging(verbose=True)
for _ in modeling_gguf_pytorch_utils.tqdm(range(5), desc="de-quantizing"):
    pass
"""


def help_lines(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_help_not_wrapped_when_piped():
    lines = help_lines(run_cli("compress", "--help", env={"COLUMNS": None}))

    assert any(NORMALIZE_HIDDEN_HELP in line for line in lines)
    assert max(len(line) for line in lines) == WIDE_COLUMNS


def test_help_follows_columns():
    lines = help_lines(run_cli("compress", "--help", env={"COLUMNS": "80"}))

    assert not any(NORMALIZE_HIDDEN_HELP in line for line in lines)
    assert max(len(line) for line in lines) == 80


def run_with_stderr(stderr: int) -> subprocess.Popen:
    environment = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    environment.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    return subprocess.Popen([sys.executable, "-c", GGUF_BAR_SCRIPT], stdout=subprocess.DEVNULL, stderr=stderr, env=environment)


def read_terminal(master: int) -> str:
    """Read what the child wrote to the pseudo-terminal until it closes its end."""
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child has exited and closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


def test_gguf_bar_hidden_when_stderr_piped():
    process = run_with_stderr(subprocess.PIPE)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 0, stderr
    assert b"de-quantizing" not in stderr


def test_gguf_bar_shown_on_terminal():
    master, slave = pty.openpty()
    # A new pseudo-terminal has 0 columns, where tqdm draws an empty bar: give it 24 x 120.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    process = run_with_stderr(slave)
    os.close(slave)
    try:
        output = read_terminal(master)
    finally:
        os.close(master)

    assert process.wait(timeout=120) == 0, output
    assert "de-quantizing" in output
    assert "5/5" in output


@pytest.fixture
def progress_bar_state(monkeypatch):
    """Restore the progress bar switches of transformers and huggingface_hub after the test."""
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_PROGRESS_BARS", None)
    monkeypatch.setattr(modeling_gguf_pytorch_utils, "tqdm", modeling_gguf_pytorch_utils.tqdm)
    transformers_enabled = transformers_logging.is_progress_bar_enabled()
    hub_disabled = huggingface_hub.utils.are_progress_bars_disabled()
    yield
    if transformers_enabled:
        transformers_logging.enable_progress_bar()
    else:
        transformers_logging.disable_progress_bar()
    if not hub_disabled:
        huggingface_hub.utils.enable_progress_bars()


def gguf_bar_output() -> str:
    buffer = io.StringIO()
    for _ in modeling_gguf_pytorch_utils.tqdm(range(3), file=buffer, desc="de-quantizing"):
        pass
    return buffer.getvalue()


def test_hidden_progress_bars(progress_bar_state):
    configure_progress_bars(show=False)

    assert not transformers_logging.is_progress_bar_enabled()
    assert huggingface_hub.utils.are_progress_bars_disabled()
    assert gguf_bar_output() == ""


def test_shown_progress_bars(progress_bar_state):
    configure_progress_bars(show=True)

    assert transformers_logging.is_progress_bar_enabled()
    assert "de-quantizing" in gguf_bar_output()


def test_environment_overrides_show(progress_bar_state, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_PROGRESS_BARS", True)

    configure_progress_bars(show=True)

    assert not transformers_logging.is_progress_bar_enabled()
    assert gguf_bar_output() == ""
