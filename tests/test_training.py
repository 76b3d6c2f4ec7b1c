"""The distillation loop in one process: memory options, non-finite steps and activation scale faults."""

from __future__ import annotations

import math
from typing import ClassVar

import pytest
import torch

import tbquant
from tbquant.losses import soft_cross_entropy
from tbquant.pipeline import registry
from tbquant.pipeline.settings import RuntimeSettings
from tbquant.quantizers.activation import ActivationQuantizer
from tbquant.training.faults import ScaleMonitor, TrainingError

from support import compress_settings, run_cli, write_training_data


@pytest.fixture(scope="module")
def llama_data(tiny_model, tmp_path_factory):
    model_dir = tiny_model("llama")
    train, valid = write_training_data(tmp_path_factory.mktemp("training-data"), model_dir, "causal-lm")
    return model_dir, train, valid


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_chunked_soft_cross_entropy_equal(chunk_size):
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(3, 11, 50, generator=generator, requires_grad=True)
    teacher = torch.randn(3, 11, 50, generator=generator)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 6:] = 0

    whole = soft_cross_entropy(student, teacher, mask, temperature=2.0)
    (whole_gradient,) = torch.autograd.grad(whole, student)
    chunked = soft_cross_entropy(student, teacher, mask, temperature=2.0, chunk_size=chunk_size)
    (chunked_gradient,) = torch.autograd.grad(chunked, student)

    assert torch.allclose(whole, chunked, rtol=1e-6, atol=1e-6)
    assert torch.allclose(whole_gradient, chunked_gradient, rtol=1e-5, atol=1e-8)


def test_memory_and_precision_options_train(llama_data, tmp_path):
    model_dir, train, valid = llama_data
    settings = compress_settings(model_dir, tmp_path / "export", train, valid, steps=3)
    settings.runtime = RuntimeSettings(
        device="cpu", mixed_precision="bf16", teacher_dtype="bfloat16", gradient_checkpointing=True, logit_chunk_size=16
    )

    state = tbquant.run_pipeline(settings)

    losses = [record["loss_total"] for record in state.history if "loss_total" in record]
    assert len(losses) == 3
    assert all(math.isfinite(loss) for loss in losses)
    assert (tmp_path / "export" / "model.safetensors").is_file()
    name = "is_activation_checkpointing" if hasattr(state.model, "is_activation_checkpointing") else "is_gradient_checkpointing"
    assert not getattr(state.model, name)


class _NanInjection:
    """A stage that makes the student's first decoder layer output NaN on chosen forward calls."""

    name = "inject-nan"
    calls: ClassVar[set[int]] = set()
    snapshot: ClassVar[dict[str, torch.Tensor]] = {}
    model: ClassVar[torch.nn.Module | None] = None

    def run(self, state) -> None:
        counter = {"calls": 0}
        type(self).model = state.model
        type(self).snapshot = {name: tensor.clone() for name, tensor in state.model.state_dict().items()}

        def poison(module, inputs, output):
            counter["calls"] += 1
            if counter["calls"] not in self.calls:
                return output
            if isinstance(output, tuple):
                return (torch.full_like(output[0], float("nan")), *output[1:])
            return torch.full_like(output, float("nan"))

        state.model.model.layers[0].register_forward_hook(poison)


@pytest.fixture
def nan_stage(monkeypatch):
    monkeypatch.setitem(registry._STAGES, "inject-nan", _NanInjection)
    return _NanInjection


def test_nan_step_skipped(llama_data, tmp_path, nan_stage):
    model_dir, train, valid = llama_data
    settings = compress_settings(model_dir, tmp_path / "export", train, valid, steps=4)
    settings.distill.eval_batches = 0
    settings.runtime = RuntimeSettings(device="cpu", max_bad_steps=2, save_every=0)
    nan_stage.calls = {2}

    state = tbquant.run_pipeline(settings, ["load", "calibrate", "inject-nan", "distill"])

    steps = [record for record in state.history if "loss_total" in record]
    assert [record.get("skipped", False) for record in steps] == [False, True, False, False]
    assert math.isnan(steps[1]["loss_total"])
    assert state.info["skipped_steps"] == 1
    assert all(torch.isfinite(parameter).all() for parameter in state.model.parameters())


def test_max_bad_steps_stops(llama_data, tmp_path, nan_stage):
    model_dir, train, valid = llama_data
    settings = compress_settings(model_dir, tmp_path / "export", train, valid, steps=6)
    settings.distill.eval_batches = 0
    settings.runtime = RuntimeSettings(device="cpu", max_bad_steps=3, save_every=0)
    nan_stage.calls = set(range(1, 100))

    with pytest.raises(TrainingError, match=r"stopped at step 3: 3 steps in a row .* last good checkpoint: none") as raised:
        tbquant.run_pipeline(settings, ["load", "calibrate", "inject-nan", "distill"])

    assert raised.value.exit_code == 1
    # No update happened, so the student still has the tensors it had before distillation.
    after = nan_stage.model.state_dict()
    assert [name for name, tensor in nan_stage.snapshot.items() if not torch.equal(tensor, after[name])] == []


def test_scale_monitor_reports_layers(llama_data, tmp_path):
    model_dir, train, valid = llama_data
    settings = compress_settings(model_dir, tmp_path / "export", train, valid, acts=2)
    state = tbquant.run_pipeline(settings, ["load", "calibrate"])
    quantizers = [module for module in state.model.modules() if isinstance(module, ActivationQuantizer) and module.learned]
    monitor = ScaleMonitor(state.model)

    with torch.no_grad():
        quantizers[0].alpha.mul_(1e-5)
        quantizers[1].alpha.mul_(1e4)
        quantizers[2].alpha.fill_(float("nan"))
    found = monitor.check(step=7)

    assert [(record["layer"], record["fault"]) for record in found] == [
        (quantizers[0].name, "collapsed"),
        (quantizers[1].name, "exploded"),
        (quantizers[2].name, "became non-finite"),
    ]
    assert all(record["step"] == 7 for record in found)
    assert monitor.check(step=8) == []


def test_diverging_run_exit_code(llama_data, tmp_path):
    model_dir, train, _ = llama_data
    checkpoints = tmp_path / "checkpoints"
    recipe = tmp_path / "distill.yaml"
    recipe.write_text("stages: [load, calibrate, distill]\n", encoding="utf-8")

    # At a learning rate of 1e30 the first update makes the weights overflow in the next forward pass.
    result = run_cli(
        "compress", str(model_dir), "--recipe", str(recipe), "--data", str(train), "--max-length", "32",
        "--batch-size", "2", "--steps", "20", "--lr", "1e30", "--warmup-ratio", "0", "--max-bad-steps", "2",
        "--save-every", "1", "--checkpoint-dir", str(checkpoints), "--eval-batches", "0", "--calibration-batches", "1",
    )  # fmt: skip

    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert result.returncode == 1, result.stderr
    assert len(errors) == 1
    assert "stopped at step 3" in errors[0]
    assert f"last good checkpoint: {checkpoints / 'step-000001'}" in errors[0]
    assert "Traceback" not in result.stderr
    assert sorted(path.name for path in checkpoints.iterdir()) == ["step-000001"]
