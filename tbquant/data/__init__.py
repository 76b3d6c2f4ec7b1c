"""Training and validation data: reading text files and turning them into model batches.

Accepted inputs:

- `.txt`: paragraphs separated by blank lines (lines inside a paragraph are joined);
- `.jsonl` / `.csv`: one record per line or row, with a `text` column, or a pair of columns
  `source`/`target` (also accepted: `article`/`summary`, `document`/`summary`,
  `input`/`output`);
- a directory: every such file in it, or `train.*` and `valid.*` / `validation.*` files used as
  the two splits.

Files are read as data only: nothing in them is evaluated.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import random
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import torch

from tbquant.errors import DataError
from tbquant.pipeline.settings import Task

SUFFIXES = (".txt", ".jsonl", ".csv")
TEXT_COLUMNS = ("text", "content", "sentence")
PAIR_COLUMNS = (("source", "target"), ("article", "summary"), ("document", "summary"), ("input", "output"))

# Fraction of the examples held out for validation when no validation split is given.
HELD_OUT_FRACTION = 0.05


@dataclasses.dataclass
class Example:
    """One record: plain text, or a source/target pair."""

    text: str | None = None
    source: str | None = None
    target: str | None = None
    # Names of the source and target columns the pair was read from, such as ("article", "summary").
    # They describe the file, not the content, so equality ignores them.
    columns: tuple[str, str] | None = dataclasses.field(default=None, compare=False)

    @property
    def is_pair(self) -> bool:
        return self.source is not None


def shipped_corpus() -> tuple[Path, Path]:
    """Return the training and validation files of the corpus that ships with tbquant."""
    folder = resources.files("tbquant.data") / "corpus"
    return Path(str(folder / "austen_train.txt")), Path(str(folder / "austen_valid.txt"))


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read data file {path}: {error.strerror}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"data file {path} is not valid UTF-8 (byte {error.start}): convert it, for example with iconv -t UTF-8"
        ) from None


def _record_example(record: dict, path: Path, location: str) -> Example:
    for source_column, target_column in PAIR_COLUMNS:
        if source_column in record and target_column in record:
            source, target = record[source_column], record[target_column]
            if not isinstance(source, str) or not isinstance(target, str):
                raise DataError(f"{path}, {location}: columns {source_column!r} and {target_column!r} must be strings")
            return Example(source=source, target=target, columns=(source_column, target_column))
    for column in TEXT_COLUMNS:
        if column in record:
            if not isinstance(record[column], str):
                raise DataError(f"{path}, {location}: column {column!r} must be a string")
            return Example(text=record[column])
    found = ", ".join(sorted(map(str, record))) or "none"
    pairs = ", ".join(f"{source}/{target}" for source, target in PAIR_COLUMNS)
    raise DataError(f"{path}, {location}: no text column (found: {found}); expected 'text' or one of the pairs {pairs}")


def read_file(path: Path) -> list[Example]:
    """Read one data file into examples.

    Raises:
        DataError: if the file is unreadable, not UTF-8, empty, malformed or lacks the columns.
    """
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"unsupported data file {path}: expected one of {', '.join(SUFFIXES)} or a directory")
    content = _read_text(path)

    examples: list[Example] = []
    if suffix == ".txt":
        paragraphs = [" ".join(block.split()) for block in content.replace("\r\n", "\n").split("\n\n")]
        examples = [Example(text=paragraph) for paragraph in paragraphs if paragraph]
    elif suffix == ".jsonl":
        for number, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}, line {number}: invalid JSON ({error.msg}); each line must be one JSON object") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}, line {number}: expected a JSON object, found {type(record).__name__}")
            examples.append(_record_example(record, path, f"line {number}"))
    else:
        reader = csv.DictReader(content.splitlines())
        for number, row in enumerate(reader, start=2):
            examples.append(_record_example({key: value for key, value in row.items() if key is not None}, path, f"row {number}"))

    examples = [example for example in examples if (example.text or example.source)]
    if not examples:
        raise DataError(f"data file {path} contains no text: pass a file with at least one non-empty record")
    return examples


def _split_files(folder: Path) -> tuple[list[Path], list[Path]]:
    files = sorted(path for path in folder.iterdir() if path.is_file() and path.suffix.lower() in SUFFIXES)
    if not files:
        raise DataError(f"data directory {folder} has no {', '.join(SUFFIXES)} files")
    train = [path for path in files if path.stem.lower() == "train"]
    valid = [path for path in files if path.stem.lower() in ("valid", "validation", "dev")]
    if train:
        return train, valid
    return files, []


def load_examples(data: Path | None, eval_data: Path | None) -> tuple[list[Example], list[Example], str]:
    """Read training and validation examples; returns them and a description of the source.

    With no `data`, the shipped corpus is used. With no validation split, the last
    `HELD_OUT_FRACTION` of the training examples is held out.
    """
    if data is None:
        train_path, valid_path = shipped_corpus()
        train_files, valid_files = [train_path], [valid_path]
        description = "shipped Austen corpus"
    else:
        if not data.exists():
            raise DataError(f"data path {data} not found: pass an existing file or directory with --data")
        train_files, valid_files = _split_files(data) if data.is_dir() else ([data], [])
        description = str(data)
    if eval_data is not None:
        if not eval_data.exists():
            raise DataError(f"validation data path {eval_data} not found: pass an existing file or directory with --eval-data")
        valid_files = _split_files(eval_data)[0] if eval_data.is_dir() else [eval_data]

    train = [example for path in train_files for example in read_file(path)]
    valid = [example for path in valid_files for example in read_file(path)]
    if not valid and len(train) >= 2:
        held_out = max(1, int(len(train) * HELD_OUT_FRACTION))
        train, valid = train[:-held_out], train[-held_out:]
    return train, valid, description


class TokenizedData:
    """Examples tokenized for one task, served as padded batches.

    Causal and encoder models train on fixed-length blocks of concatenated text (no padding);
    sequence-to-sequence models train on source -> target pairs, or reconstruct the text when
    the examples are plain text.
    """

    def __init__(self, examples: list[Example], tokenizer, task: Task, max_length: int) -> None:
        self.task = task
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        if task == Task.SEQ2SEQ_LM:
            self.items = self._pairs(examples, tokenizer, max_length)
        else:
            self.items = self._blocks(examples, tokenizer, max_length)
        if not self.items:
            raise DataError("the data produced no training sequences: pass more text or lower --max-length")

    @staticmethod
    def _blocks(examples: list[Example], tokenizer, max_length: int) -> list[dict[str, torch.Tensor]]:
        separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        texts = [example.text if not example.is_pair else f"{example.source}\n{example.target}" for example in examples]
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        stream: list[int] = []
        for ids in encoded:
            stream.extend(ids)
            if separator is not None:
                stream.append(separator)
        usable = len(stream) // max_length * max_length
        if usable == 0 and stream:
            # Text shorter than one block: keep it as a single shorter block.
            return [{"input_ids": torch.tensor(stream[:max_length])}]
        return [{"input_ids": torch.tensor(stream[start : start + max_length])} for start in range(0, usable, max_length)]

    @staticmethod
    def _pairs(examples: list[Example], tokenizer, max_length: int) -> list[dict[str, torch.Tensor]]:
        sources = [example.source if example.is_pair else example.text for example in examples]
        targets = [example.target if example.is_pair else example.text for example in examples]
        encoded = tokenizer(sources, text_target=targets, max_length=max_length, truncation=True)
        return [
            {"input_ids": torch.tensor(source), "labels": torch.tensor(target)}
            for source, target in zip(encoded["input_ids"], encoded["labels"])
            if source and target
        ]

    def __len__(self) -> int:
        return len(self.items)

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Pad a list of items into a batch with attention masks (and -100 for padded labels)."""
        batch: dict[str, torch.Tensor] = {}
        length = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, item in enumerate(items):
            input_ids[row, : len(item["input_ids"])] = item["input_ids"]
            attention_mask[row, : len(item["input_ids"])] = 1
        batch["input_ids"], batch["attention_mask"] = input_ids, attention_mask

        if self.task == Task.SEQ2SEQ_LM:
            target_length = max(len(item["labels"]) for item in items)
            labels = torch.full((len(items), target_length), -100, dtype=torch.long)
            for row, item in enumerate(items):
                labels[row, : len(item["labels"])] = item["labels"]
            batch["labels"] = labels
        elif self.task == Task.CAUSAL_LM:
            batch["labels"] = input_ids.masked_fill(attention_mask == 0, -100)
        return batch

    def batches(self, batch_size: int, limit: int | None = None) -> list[dict[str, torch.Tensor]]:
        """Return the data in order as batches, at most `limit` of them."""
        batches = []
        for start in range(0, len(self.items), batch_size):
            if limit is not None and len(batches) >= limit:
                break
            batches.append(self.collate(self.items[start : start + batch_size]))
        return batches

    def shuffled_batches(self, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        """Yield batches forever, reshuffling the items at each epoch with a seeded generator."""
        for indices in self.shuffled_indices(batch_size, seed):
            yield self.collate([self.items[index] for index in indices])

    def shuffled_indices(self, batch_size: int, seed: int) -> Iterator[list[int]]:
        """Yield the item indices of each batch forever, reshuffling at each epoch with a seeded
        generator. The sequence depends only on `batch_size` and `seed`, so a resumed run skips
        the batches it has consumed by drawing them again without collating them."""
        generator = random.Random(seed)
        order = list(range(len(self.items)))
        while True:
            generator.shuffle(order)
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                if len(chunk) < batch_size and len(order) >= batch_size:
                    continue  # drop the incomplete last batch of an epoch
                yield chunk
