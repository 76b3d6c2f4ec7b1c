"""Distillation on 2 CPU processes (gloo), launched with `accelerate launch` and `torchrun`.

Two processes with `--batch-size 2` train on the same global batch of 4 sequences per step as
one process with `--batch-size 2 --grad-accum 2`: the data order depends only on the seed and
the global batch, and each process takes its half. Both compute the loss on micro-batches of 2
sequences, so the per-micro-batch normalisation of the hidden-state loss is the same too. The
tolerance is 1e-6 (measured: the results are bit-identical on this machine).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from support import run_cli, write_distill_setup

STEPS = 4
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory) -> dict[str, Path]:
    return write_distill_setup(tiny_model("llama"), tmp_path_factory.mktemp("distributed"))


def compress_options(setup: dict[str, Path], checkpoints: Path, *extra: str) -> list[str]:
    # 2-bit activations, so that the learned activation scales are trained too.
    return [
        "compress", str(setup["model"]), "--recipe", str(setup["recipe"]), "--data", str(setup["train"]),
        "--max-length", "32", "--batch-size", "2", "--steps", str(STEPS), "--lr", "2e-3", "--acts", "2",
        "--eval-batches", "0", "--calibration-batches", "1", "--device", "cpu", "--save-every", str(STEPS),
        "--checkpoint-dir", str(checkpoints), *extra,
    ]  # fmt: skip


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free now, so parallel runs do not share accelerate's default 29500."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_two_processes(launcher: str, arguments: list[str]) -> subprocess.CompletedProcess:
    """Run `python -m tbquant ARGUMENTS` on 2 local processes with `launcher`."""
    environment = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", NO_COLOR="1", COLUMNS="200")
    if launcher == "accelerate":
        # --multi_gpu selects accelerate's torchrun-based launcher; on a machine without CUDA
        # (and with --device cpu) the process group uses gloo.
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(free_port())]  # fmt: skip
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(
        [*command, "-m", "tbquant", *arguments], capture_output=True, text=True, env=environment, timeout=300, check=False
    )


@pytest.fixture(scope="module")
def single_process(setup) -> Path:
    checkpoints = setup["folder"] / "single"
    result = run_cli(*compress_options(setup, checkpoints, "--grad-accum", "2"))
    assert result.returncode == 0, result.stderr
    return checkpoints / f"step-{STEPS:06d}"


@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_two_processes_match_one(setup, single_process, launcher, tmp_path):
    checkpoints = tmp_path / "checkpoints"

    result = launch_two_processes(launcher, compress_options(setup, checkpoints))

    assert result.returncode == 0, result.stdout + result.stderr
    checkpoint = checkpoints / f"step-{STEPS:06d}"
    trainer_state = json.loads((checkpoint / "trainer_state.json").read_text())
    hashes = trainer_state["process_student_sha256"]
    assert len(hashes) == 2
    assert hashes[0] == hashes[1]
    assert trainer_state["fingerprint"]["processes"] == 2
    assert len(torch.load(checkpoint / "training_state.pt", weights_only=True)["rng"]) == 2

    expected, actual = load_file(single_process / "student.safetensors"), load_file(checkpoint / "student.safetensors")
    assert expected.keys() == actual.keys()
    assert any(name.endswith("alpha") for name in actual)
    differences = {name: (expected[name].double() - actual[name].double()).abs().max().item() for name in expected}
    assert max(differences.values()) <= TOLERANCE, max(differences.items(), key=lambda item: item[1])


def test_two_processes_export_once(setup, tmp_path):
    output = tmp_path / "export"
    arguments = compress_options(setup, tmp_path / "checkpoints", "--output", str(output))
    arguments.remove("--recipe")
    arguments.remove(str(setup["recipe"]))

    result = launch_two_processes("accelerate", arguments)

    assert result.returncode == 0, result.stdout + result.stderr
    log = json.loads((output / "training_log.json").read_text())
    assert log["info"]["distill_processes"] == 2
    assert len(set(log["info"]["process_student_sha256"])) == 1
    assert result.stdout.count("before and after") == 1
    assert not (tmp_path / "checkpoints").exists()


def test_two_processes_resume_identical(setup, tmp_path):
    full = tmp_path / "full"
    result = launch_two_processes("torchrun", compress_options(setup, full, "--save-every", "2"))
    assert result.returncode == 0, result.stdout + result.stderr

    # A run stopped after step 2 leaves the checkpoint of step 2 as its latest one.
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copytree(full / "step-000002", stopped / "step-000002")
    resumed = launch_two_processes("torchrun", compress_options(setup, stopped, "--save-every", "2", "--resume"))

    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    expected = load_file(full / f"step-{STEPS:06d}" / "student.safetensors")
    actual = load_file(stopped / f"step-{STEPS:06d}" / "student.safetensors")
    assert [name for name in expected if not torch.equal(expected[name], actual[name])] == []
