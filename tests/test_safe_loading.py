"""Nothing in a checkpoint, recipe or data file is executed.

- `.bin` checkpoints load through `torch.load(weights_only=True)`: plain tensors load, any other
  pickled object is rejected before it runs;
- a checkpoint's own Python code (`auto_map` in its config) runs only with `trust_remote_code`;
- recipes are read with `yaml.safe_load` (no Python tags) or `tomllib`;
- data files are parsed as text, JSON and CSV only.
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from support import TouchOnUnpickle

import tbquant
from tbquant.data import read_file
from tbquant.errors import ModelLoadError, TbquantError
from tbquant.pipeline.runner import read_recipe
from tbquant.stages.load import load_model_and_tokenizer

PACKAGE = Path(tbquant.__file__).parent


def model_without_weights(model_dir: Path, folder: Path) -> Path:
    """Copy a saved model's config and tokenizer files, but not its weights, into `folder`."""
    shutil.copytree(model_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    return folder


def test_pickle_with_code_rejected(tiny_model, tmp_path):
    model_dir = model_without_weights(tiny_model("llama"), tmp_path / "model")
    marker = tmp_path / "executed"
    state_dict = transformers.AutoModelForCausalLM.from_pretrained(tiny_model("llama")).state_dict()
    state_dict["model.norm.weight"] = TouchOnUnpickle(marker)
    torch.save(state_dict, model_dir / "pytorch_model.bin")

    with pytest.raises(ModelLoadError) as raised:
        load_model_and_tokenizer(str(model_dir))

    assert not marker.exists()
    assert str(raised.value).startswith(f"rejected the weights of {str(model_dir)!r}: the .bin checkpoint contains pickled objects")


def test_plain_bin_loads(tiny_model, tmp_path):
    original = transformers.AutoModelForCausalLM.from_pretrained(tiny_model("llama"))
    model_dir = model_without_weights(tiny_model("llama"), tmp_path / "model")
    torch.save(original.state_dict(), model_dir / "pytorch_model.bin")

    loaded, _, _ = load_model_and_tokenizer(str(model_dir))

    assert torch.equal(loaded.model.norm.weight, original.model.norm.weight)


@pytest.fixture
def remote_code_model(tmp_path) -> tuple[Path, Path]:
    """A model directory whose config points to its own Python code, which creates a marker file."""
    folder = tmp_path / "custom-model"
    folder.mkdir()
    marker = tmp_path / "executed"
    (folder / "custom.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n", encoding="utf-8")
    config = {"model_type": "tbquant-custom", "auto_map": {"AutoConfig": "custom.Config", "AutoModelForCausalLM": "custom.Model"}}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder, marker


def test_remote_code_needs_flag(remote_code_model):
    folder, marker = remote_code_model

    with pytest.raises(ModelLoadError) as raised:
        load_model_and_tokenizer(str(folder))

    assert not marker.exists()
    assert str(raised.value).endswith("runs only with --trust-remote-code: pass it if you trust the code of this model")


def test_trust_remote_code_off_by_default():
    settings = tbquant.CompressSettings(model="m", output=Path("out"))

    assert settings.trust_remote_code is False


def test_recipe_python_tag_rejected(tmp_path):
    marker = tmp_path / "executed"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"stages: !!python/object/apply:pathlib.Path.touch [{str(marker)!r}]\n", encoding="utf-8")

    with pytest.raises(TbquantError, match="invalid recipe file .*python/object/apply"):
        read_recipe(recipe)

    assert not marker.exists()


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("code.jsonl", '{"text": "__import__(\'os\').system(\'touch MARKER\')"}\n'),
        ("code.csv", "text\n\"__import__('os').system('touch MARKER')\"\n"),
        ("code.txt", "__import__('os').system('touch MARKER')\n"),
    ],
    ids=["jsonl", "csv", "txt"],
)
def test_data_text_is_not_evaluated(tmp_path, name, content):
    marker = tmp_path / "MARKER"
    path = tmp_path / name
    path.write_text(content.replace("MARKER", str(marker)), encoding="utf-8")

    examples = read_file(path)

    assert examples[0].text == f"__import__('os').system('touch {marker}')"
    assert not marker.exists()


def _unsafe_calls(tree: ast.AST) -> list[str]:
    """Return the calls in `tree` that could execute code from a file."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        function = node.func
        name = ast.unparse(function)
        keywords = {keyword.arg: keyword.value for keyword in node.keywords}
        if name in ("eval", "exec", "pickle.load", "pickle.loads", "yaml.load", "yaml.unsafe_load", "yaml.full_load"):
            found.append(f"{name} at line {node.lineno}")
        elif name == "torch.load":
            weights_only = keywords.get("weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                found.append(f"torch.load without weights_only=True at line {node.lineno}")
        remote = keywords.get("trust_remote_code")
        if isinstance(remote, ast.Constant) and remote.value is True:
            found.append(f"trust_remote_code=True at line {node.lineno}")
    return found


@pytest.mark.parametrize("source", sorted(PACKAGE.rglob("*.py")), ids=lambda path: str(path.relative_to(PACKAGE)))
def test_source_has_no_unsafe_loading(source):
    tree = ast.parse(source.read_text(encoding="utf-8"))

    assert _unsafe_calls(tree) == []


def test_unsafe_call_scan_finds_examples():
    tree = ast.parse("torch.load(f)\nyaml.load(s)\nmodel(trust_remote_code=True)\ntorch.load(f, weights_only=True)\nmodel.eval()\n")

    assert _unsafe_calls(tree) == [
        "torch.load without weights_only=True at line 1",
        "yaml.load at line 2",
        "trust_remote_code=True at line 3",
    ]
