"""Checkpoints and `--resume`, run as `python -m tbquant` in subprocesses on the tiny Llama."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from support import run_cli, write_distill_setup

@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """Return the tiny Llama, a training file of 8 sequences and a distill-only recipe."""
    return write_distill_setup(tiny_model("llama"), tmp_path_factory.mktemp("resume"))


def options(setup: dict[str, Path], checkpoints: Path, steps: int, *extra: str) -> list[str]:
    return [
        "compress", str(setup["model"]), "--recipe", str(setup["recipe"]), "--data", str(setup["train"]),
        "--max-length", "32", "--batch-size", "2", "--steps", str(steps), "--lr", "2e-3", "--acts", "2",
        "--eval-batches", "0", "--calibration-batches", "1", "--device", "cpu", "--checkpoint-dir", str(checkpoints), *extra,
    ]  # fmt: skip


def launch(arguments: list[str], log: Path) -> subprocess.Popen:
    """Start `python -m tbquant ARGUMENTS` in the background, with its output in `log`."""
    environment = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", NO_COLOR="1", COLUMNS="200")
    handle = log.open("w")
    return subprocess.Popen([sys.executable, "-m", "tbquant", *arguments], stdout=handle, stderr=subprocess.STDOUT, env=environment)


def wait_for(condition, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the run ended before the condition held"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Return the student's tensors and the optimizer's state tensors of a checkpoint."""
    found = dict(load_file(checkpoint / "student.safetensors"))
    training_state = torch.load(checkpoint / "training_state.pt", weights_only=True)
    for index, state in training_state["optimizer"]["state"].items():
        for key, value in state.items():
            found[f"optimizer.{index}.{key}"] = value
    return found


def test_resume_after_sigkill_bit_identical(setup, tmp_path):
    steps = 30
    reference = tmp_path / "reference"
    result = run_cli(*options(setup, reference, steps, "--save-every", str(steps)))
    assert result.returncode == 0, result.stderr

    interrupted = tmp_path / "interrupted"
    process = launch(options(setup, interrupted, steps, "--save-every", "3"), tmp_path / "killed.log")
    # Kill at once when the second checkpoint appears: the run is then inside the step after it.
    wait_for(lambda: (interrupted / "step-000006").is_dir(), process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    killed_at = max(int(path.name.split("-")[1]) for path in interrupted.glob("step-*"))
    assert killed_at < steps

    resumed = run_cli(*options(setup, interrupted, steps, "--save-every", "3", "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming from {interrupted / f'step-{killed_at:06d}'}" in " ".join(resumed.stderr.split())

    expected, actual = tensors(reference / f"step-{steps:06d}"), tensors(interrupted / f"step-{steps:06d}")
    assert expected.keys() == actual.keys()
    different = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert different == []


def test_keep_checkpoints_limit(setup, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    result = run_cli(*options(setup, checkpoints, 6, "--save-every", "1", "--keep-checkpoints", "2"))

    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in checkpoints.iterdir()) == ["step-000005", "step-000006"]


@pytest.fixture(scope="module")
def finished(setup, tmp_path_factory) -> Path:
    """Return a checkpoint directory holding the final checkpoint of a 2-step ternary run."""
    checkpoints = tmp_path_factory.mktemp("finished") / "checkpoints"
    result = run_cli(*options(setup, checkpoints, 2, "--save-every", "2"))
    assert result.returncode == 0, result.stderr
    return checkpoints


@pytest.mark.parametrize(
    ("steps", "extra", "names"),
    [
        (2, ["--weights", "binary"], ["quantization.weights.scheme", "'ternary'", "'binary'"]),
        (2, ["--lr", "1e-3"], ["distill.lr", "0.002", "0.001"]),
        (4, [], ["distill.steps"]),
    ],
)
def test_resume_rejects_other_settings(setup, finished, steps, extra, names):
    before = sorted(path.name for path in finished.iterdir())

    # A repeated option takes its last value, so `extra` overrides the defaults of `options`.
    result = run_cli(*options(setup, finished, steps, "--resume", *extra))

    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert result.returncode == 2, result.stderr
    assert len(errors) == 1
    assert "comes from a different run" in errors[0]
    for name in names:
        assert name in errors[0]
    assert sorted(path.name for path in finished.iterdir()) == before


def test_resume_settings_checked_before_loading(setup, finished, tmp_path):
    arguments = options(setup, finished, 2, "--resume", "--weights", "binary")
    # A model path that does not exist fails only when the load stage runs.
    arguments[1] = str(tmp_path / "absent-model")

    result = run_cli(*arguments)

    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert result.returncode == 2, result.stderr
    assert len(errors) == 1, result.stderr
    assert "comes from a different run" in errors[0]
    assert "quantization.weights.scheme" in errors[0]
    assert "Stage load" not in result.stderr


def test_resume_invalid_trainer_state(setup, tmp_path):
    checkpoint = tmp_path / "checkpoints" / "step-000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{", encoding="utf-8")

    result = run_cli(*options(setup, checkpoint.parent, 2, "--resume"))

    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert result.returncode == 2, result.stderr
    assert len(errors) == 1, result.stderr
    assert f"cannot read checkpoint {checkpoint}" in errors[0]
    assert "trainer_state.json" in errors[0]


def test_existing_checkpoints_need_resume(setup, finished):
    result = run_cli(*options(setup, finished, 2))

    assert result.returncode == 2
    assert "already contains checkpoints" in result.stderr
    assert "--resume" in result.stderr


def test_resume_without_checkpoint(setup, tmp_path):
    result = run_cli(*options(setup, tmp_path / "empty", 2, "--resume"))

    assert result.returncode == 2
    assert "contains no complete checkpoint" in result.stderr


def test_sigint_saves_checkpoint(setup, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    log = tmp_path / "run.log"
    process = launch(options(setup, checkpoints, 100000, "--save-every", "0"), log)
    wait_for(lambda: "Distillation runs on" in log.read_text(), process)
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    process.wait(timeout=60)

    output = log.read_text()
    saved = list(checkpoints.glob("step-*"))
    assert process.returncode == 130, output
    assert "Error: interrupted" in output
    assert len(saved) == 1
    assert (saved[0] / "student.safetensors").is_file()
