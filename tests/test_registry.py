"""Stage registry: built-in stages, stages of other packages through the `tbquant.stages` entry
point group, the `register_stage` decorator, and recipes that choose the stages."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from support import compress_settings, model_output, real_batch, run_cli, write_training_data

import tbquant
from tbquant.errors import TbquantError
from tbquant.pipeline import registry
from tbquant.pipeline.registry import ENTRY_POINT_GROUP, available_stages, get_stage, register_stage
from tbquant.pipeline.runner import read_recipe
from tbquant.nn.linear import OUTPUT_TOLERANCE

PLUGIN_MODULE = "tbquant_test_plugin"


@pytest.fixture
def isolated_registry(monkeypatch):
    """Give the test its own copy of the registry and reset the entry-point cache, so that
    stages registered here do not leak into other tests."""
    available_stages()  # registers the built-in stages first
    monkeypatch.setattr(registry, "_STAGES", dict(registry._STAGES))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    yield
    sys.modules.pop(PLUGIN_MODULE, None)


def write_plugin(root: Path, entry_points: str, module_source: str) -> Path:
    """Create an installed distribution under `root`, as `pip install --target root` would: a
    module plus a `.dist-info` folder with its metadata and entry points. Returns `root`."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{PLUGIN_MODULE}.py").write_text(textwrap.dedent(module_source), encoding="utf-8")
    dist_info = root / "tbquant_test_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: tbquant-test-plugin\nVersion: 0.1\n", encoding="utf-8")
    (dist_info / "entry_points.txt").write_text(textwrap.dedent(entry_points), encoding="utf-8")
    return root


def install_plugin(root: Path, monkeypatch, entry_points: str, module_source: str) -> None:
    """Write the distribution and put `root` on `sys.path` of this process for the test."""
    write_plugin(root, entry_points, module_source)
    monkeypatch.syspath_prepend(str(root))
    sys.modules.pop(PLUGIN_MODULE, None)


MARKER_STAGE = """
    class MarkerStage:
        \"\"\"Record that the plugin ran.\"\"\"

        name = "marker"

        def run(self, state):
            state.info["marker_ran"] = state.info.get("marker_ran", 0) + 1
    """


def test_builtin_stages_registered():
    stages = available_stages()

    assert {"load", "calibrate", "distill", "pack", "export"} <= set(stages)


def test_entry_point_stage_found(isolated_registry, tmp_path, monkeypatch):
    install_plugin(tmp_path / "site", monkeypatch, f"[{ENTRY_POINT_GROUP}]\nmarker = {PLUGIN_MODULE}:MarkerStage\n", MARKER_STAGE)

    stage = get_stage("marker")

    assert stage.__module__ == PLUGIN_MODULE
    assert stage.__name__ == "MarkerStage"


def test_entry_point_stage_runs(isolated_registry, tmp_path, monkeypatch):
    install_plugin(tmp_path / "site", monkeypatch, f"[{ENTRY_POINT_GROUP}]\nmarker = {PLUGIN_MODULE}:MarkerStage\n", MARKER_STAGE)
    settings = compress_settings(tmp_path / "unused-model", tmp_path / "unused-output", data=None)

    state = tbquant.run_pipeline(settings, ["marker", "marker"])

    assert state.info["marker_ran"] == 2
    assert set(state.info["stage_seconds"]) == {"marker"}


def test_entry_point_name_wins(isolated_registry, tmp_path, monkeypatch):
    # The class calls itself "marker", and the entry point registers it as "tag".
    install_plugin(tmp_path / "site", monkeypatch, f"[{ENTRY_POINT_GROUP}]\ntag = {PLUGIN_MODULE}:MarkerStage\n", MARKER_STAGE)

    stage = get_stage("tag")

    assert stage.name == "tag"


def test_broken_entry_point_raises(isolated_registry, tmp_path, monkeypatch):
    install_plugin(
        tmp_path / "site",
        monkeypatch,
        f"[{ENTRY_POINT_GROUP}]\nbroken = {PLUGIN_MODULE}:Missing\n",
        MARKER_STAGE,
    )

    with pytest.raises(TbquantError, match=f"cannot load stage 'broken' from {PLUGIN_MODULE}:Missing"):
        available_stages()


def test_entry_point_cannot_replace_builtin(isolated_registry, tmp_path, monkeypatch):
    install_plugin(tmp_path / "site", monkeypatch, f"[{ENTRY_POINT_GROUP}]\nload = {PLUGIN_MODULE}:MarkerStage\n", MARKER_STAGE)

    assert get_stage("load").__module__ == "tbquant.stages.load"


def test_register_stage_decorator(isolated_registry, tmp_path):
    @register_stage
    class CountStage:
        name = "count-parameters"

        def run(self, state):
            state.info["counted"] = True

    settings = compress_settings(tmp_path / "unused-model", tmp_path / "unused-output", data=None)
    state = tbquant.run_pipeline(settings, ["count-parameters"])

    assert get_stage("count-parameters") is CountStage
    assert state.info["counted"] is True


def test_register_stage_without_name_raises(isolated_registry):
    class Nameless:
        def run(self, state):
            pass

    with pytest.raises(TypeError, match="Nameless needs a non-empty string attribute 'name'"):
        register_stage(Nameless)


def test_register_stage_without_run_raises(isolated_registry):
    class NoRun:
        name = "no-run"

    with pytest.raises(TypeError, match="NoRun needs a method run"):
        register_stage(NoRun)


def test_unknown_stage_names_available():
    with pytest.raises(TbquantError) as raised:
        get_stage("prune")

    message = str(raised.value)
    assert "unknown stage 'prune'" in message
    assert "calibrate, distill, export, load, pack" in message


def test_unknown_stage_fails_before_running(isolated_registry, tmp_path):
    ran = []

    @register_stage
    class FirstStage:
        name = "first"

        def run(self, state):
            ran.append(True)

    settings = compress_settings(tmp_path / "unused-model", tmp_path / "unused-output", data=None)

    with pytest.raises(TbquantError, match="unknown stage 'typo'"):
        tbquant.run_pipeline(settings, ["first", "typo"])
    assert ran == []


def test_distill_without_calibrate_raises(tiny_model, tmp_path):
    model_dir = tiny_model("bert")
    train, valid = write_training_data(tmp_path / "data", model_dir, "encoder")
    settings = compress_settings(model_dir, tmp_path / "export", train, valid)

    with pytest.raises(TbquantError, match="run the calibrate stage before distill"):
        tbquant.run_pipeline(settings, ["load", "distill"])


def test_export_without_pack_raises(tiny_model, tmp_path):
    model_dir = tiny_model("bert")
    train, valid = write_training_data(tmp_path / "data", model_dir, "encoder")
    settings = compress_settings(model_dir, tmp_path / "export", train, valid)

    with pytest.raises(TbquantError, match="run the pack stage before export"):
        tbquant.run_pipeline(settings, ["load", "calibrate", "export"])
    assert not (tmp_path / "export").exists()


def test_post_training_pipeline(tiny_model, tmp_path):
    model_dir = tiny_model("bart")
    train, valid = write_training_data(tmp_path / "data", model_dir, "seq2seq-lm")
    settings = compress_settings(model_dir, tmp_path / "export", train, valid)

    state = tbquant.run_pipeline(settings, ["load", "calibrate", "pack", "export"])
    loaded, tokenizer = tbquant.load_quantized(tmp_path / "export")

    batch = real_batch(tokenizer, "seq2seq-lm")
    assert state.history == []
    assert state.info["pack_max_relative_layer_difference"] <= OUTPUT_TOLERANCE
    assert torch.equal(model_output(loaded, batch), model_output(state.model, batch))


# Recipes


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("ptq.yaml", "stages: [load, calibrate, pack, export]\noptions: {weights: binary, steps: 0}\n"),
        ("ptq.yml", "stages:\n  - load\n  - calibrate\n  - pack\n  - export\noptions:\n  weights: binary\n  steps: 0\n"),
        ("ptq.toml", 'stages = ["load", "calibrate", "pack", "export"]\n[options]\nweights = "binary"\nsteps = 0\n'),
    ],
)
def test_read_recipe_formats(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")

    recipe = read_recipe(path)

    assert recipe == {"stages": ["load", "calibrate", "pack", "export"], "options": {"weights": "binary", "steps": 0}}


def test_read_recipe_options_only(tmp_path):
    path = tmp_path / "options.yaml"
    path.write_text("options: {acts: 2}\n", encoding="utf-8")

    assert read_recipe(path) == {"stages": None, "options": {"acts": 2}}


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("missing.yaml", None, "not found"),
        ("recipe.json", "{}", "use a .yaml, .yml or .toml file"),
        ("broken.yaml", "stages: [load\n", "invalid recipe file"),
        ("broken.toml", "stages = [\n", "invalid recipe file"),
        ("list.yaml", "- load\n- pack\n", "expected a mapping"),
        ("extra.yaml", "stages: [load]\nsteps: 3\n", "unknown keys steps"),
        ("empty-stages.yaml", "stages: []\n", "'stages' must be a non-empty list"),
        ("number-stages.yaml", "stages: [1, 2]\n", "'stages' must be a non-empty list"),
        ("options-list.yaml", "options: [steps]\n", "'options' must be a mapping"),
    ],
)
def test_bad_recipe_raises(tmp_path, name, text, message):
    path = tmp_path / name
    if text is not None:
        path.write_text(text, encoding="utf-8")

    with pytest.raises(TbquantError, match=message):
        read_recipe(path)


def test_recipe_cli_post_training(tiny_model, tmp_path):
    model_dir = tiny_model("llama")
    train, valid = write_training_data(tmp_path / "data", model_dir, "causal-lm")
    recipe = tmp_path / "ptq.yaml"
    recipe.write_text(
        "stages: [load, calibrate, pack, export]\n"
        f"options: {{weights: binary, acts: 4, data: '{train}', eval_data: '{valid}', max_length: 32, batch_size: 2,"
        " calibration_batches: 1, eval_batches: 1, steps: 50}\n",
        encoding="utf-8",
    )
    output = tmp_path / "export"

    result = run_cli("compress", str(model_dir), "--recipe", str(recipe), "--acts", "8", "--output", str(output))

    assert result.returncode == 0, result.stderr
    config = json.loads((output / "config.json").read_text(encoding="utf-8"))["quantization_config"]
    log = json.loads((output / "training_log.json").read_text(encoding="utf-8"))
    assert config["weights"]["scheme"] == "binary"
    assert config["activations"]["bits"] == 8  # the command line wins over the recipe
    assert log["history"] == []
    # The log is written during export, so it times the stages before it.
    assert sorted(log["info"]["stage_seconds"]) == ["calibrate", "load", "pack"]


def test_recipe_cli_plugin_stage(tiny_model, tmp_path):
    site = write_plugin(tmp_path / "site", f"[{ENTRY_POINT_GROUP}]\nmarker = {PLUGIN_MODULE}:MarkerStage\n", MARKER_STAGE)
    recipe = tmp_path / "plugin.toml"
    recipe.write_text('stages = ["marker"]\n', encoding="utf-8")

    result = run_cli(
        "compress",
        str(tiny_model("llama")),
        "--recipe",
        str(recipe),
        "--output",
        str(tmp_path / "export"),
        env={"PYTHONPATH": str(site)},
    )

    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "export").exists()


def test_stages_command_lists_plugin(tmp_path):
    site = write_plugin(tmp_path / "site", f"[{ENTRY_POINT_GROUP}]\nmarker = {PLUGIN_MODULE}:MarkerStage\n", MARKER_STAGE)

    result = run_cli("stages", env={"PYTHONPATH": str(site)})

    assert result.returncode == 0, result.stderr
    assert "marker" in result.stdout
    assert "Record that the plugin ran." in result.stdout
