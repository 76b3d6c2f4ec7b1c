"""Reading training data (txt, jsonl, csv, directories), the held-out split, and batching."""

from __future__ import annotations

import json

import pytest
import torch
from support import corpus_pairs

from tbquant.data import HELD_OUT_FRACTION, Example, TokenizedData, load_examples, read_file, shipped_corpus
from tbquant.errors import DataError
from tbquant.pipeline.settings import Task


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


# Reading files


def test_txt_paragraphs(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("First line\nof one paragraph.\n\nSecond   paragraph.\n\n\n\nThird.\n", encoding="utf-8")

    examples = read_file(path)

    assert [example.text for example in examples] == ["First line of one paragraph.", "Second paragraph.", "Third."]


def test_txt_windows_line_endings(tmp_path):
    path = tmp_path / "book.txt"
    path.write_bytes(b"One\r\ntwo.\r\n\r\nThree.\r\n")

    examples = read_file(path)

    assert [example.text for example in examples] == ["One two.", "Three."]


def test_jsonl_text_column(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "alpha", "id": 1}, {"text": "beta"}])

    examples = read_file(path)

    assert examples == [Example(text="alpha"), Example(text="beta")]


@pytest.mark.parametrize(
    ("source_column", "target_column"),
    [("source", "target"), ("article", "summary"), ("document", "summary"), ("input", "output")],
)
def test_jsonl_pair_columns(tmp_path, source_column, target_column):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{source_column: "a long text", target_column: "short"}])

    examples = read_file(path)

    assert examples == [Example(source="a long text", target="short")]
    assert examples[0].is_pair
    assert examples[0].columns == (source_column, target_column)


@pytest.mark.parametrize("column", ["content", "sentence"])
def test_jsonl_other_text_columns(tmp_path, column):
    path = write_jsonl(tmp_path / "data.jsonl", [{column: "words"}])

    assert read_file(path) == [Example(text="words")]


def test_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a"}\n\n   \n{"text": "b"}\n', encoding="utf-8")

    assert [example.text for example in read_file(path)] == ["a", "b"]


def test_jsonl_drops_empty_records(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": ""}, {"text": "kept"}])

    assert read_file(path) == [Example(text="kept")]


def test_shipped_pairs_file_reads():
    examples = read_file(shipped_corpus()[0].parent / "bible_en_es_sample.jsonl")

    assert len(examples) == 200
    assert all(example.is_pair for example in examples)


def test_csv_text_column(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('text,label\n"Hello, world",1\nSecond row,0\n', encoding="utf-8")

    assert read_file(path) == [Example(text="Hello, world"), Example(text="Second row")]


def test_csv_pair_columns(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("source,target\nbonjour,hello\n", encoding="utf-8")

    assert read_file(path) == [Example(source="bonjour", target="hello")]


def test_suffix_case_insensitive(tmp_path):
    path = tmp_path / "BOOK.TXT"
    path.write_text("Text.\n", encoding="utf-8")

    assert read_file(path) == [Example(text="Text.")]


# Reading errors


def test_unsupported_suffix_raises(tmp_path):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1")

    with pytest.raises(DataError, match=r"data\.parquet"):
        read_file(path)


@pytest.mark.parametrize("name", ["empty.txt", "empty.jsonl", "empty.csv"])
def test_empty_file_raises(tmp_path, name):
    path = tmp_path / name
    path.write_text("\n\n" if name.endswith(".txt") else "", encoding="utf-8")

    with pytest.raises(DataError, match=f"{name} contains no text"):
        read_file(path)


def test_non_utf8_raises(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 au lait".encode("latin-1"))

    with pytest.raises(DataError, match=r"latin1\.txt is not valid UTF-8 \(byte 3\)"):
        read_file(path)


def test_jsonl_invalid_json_names_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a"}\n{"text": \n', encoding="utf-8")

    with pytest.raises(DataError, match="line 2: invalid JSON"):
        read_file(path)


def test_jsonl_non_object_raises(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('["a", "b"]\n', encoding="utf-8")

    with pytest.raises(DataError, match="line 1: expected a JSON object, found list"):
        read_file(path)


def test_jsonl_missing_columns_names_found(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"question": "q", "answer": "a"}])

    with pytest.raises(DataError) as raised:
        read_file(path)

    message = str(raised.value)
    assert "line 1" in message
    assert "found: answer, question" in message
    assert "source/target" in message


def test_jsonl_non_string_column_raises(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": 42}])

    with pytest.raises(DataError, match="column 'text' must be a string"):
        read_file(path)


def test_jsonl_non_string_pair_raises(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"source": "a", "target": None}])

    with pytest.raises(DataError, match="'source' and 'target' must be strings"):
        read_file(path)


def test_csv_missing_columns_names_row(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("title,body\nA,B\n", encoding="utf-8")

    with pytest.raises(DataError, match=r"row 2: no text column \(found: body, title\)"):
        read_file(path)


# Splits


def paragraphs_file(path, count):
    path.write_text("\n\n".join(f"Paragraph number {index}." for index in range(count)) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(("count", "held_out"), [(2, 1), (10, 1), (40, 2), (100, 5)])
def test_held_out_split_size(tmp_path, count, held_out):
    path = paragraphs_file(tmp_path / "book.txt", count)

    train, valid, _ = load_examples(path, None)

    assert held_out == max(1, int(count * HELD_OUT_FRACTION))
    assert len(valid) == held_out
    assert len(train) == count - held_out


def test_held_out_is_last_examples(tmp_path):
    path = paragraphs_file(tmp_path / "book.txt", 40)

    train, valid, _ = load_examples(path, None)

    assert [example.text for example in valid] == ["Paragraph number 38.", "Paragraph number 39."]
    assert train[-1].text == "Paragraph number 37."


def test_single_example_not_split(tmp_path):
    path = paragraphs_file(tmp_path / "book.txt", 1)

    train, valid, _ = load_examples(path, None)

    assert len(train) == 1
    assert valid == []


def test_explicit_eval_file_used(tmp_path):
    train_path = paragraphs_file(tmp_path / "train.txt", 10)
    valid_path = write_jsonl(tmp_path / "valid.jsonl", [{"text": "held"}])

    train, valid, description = load_examples(train_path, valid_path)

    assert len(train) == 10
    assert valid == [Example(text="held")]
    assert description == str(train_path)


def test_directory_train_valid_files(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    paragraphs_file(folder / "train.txt", 6)
    write_jsonl(folder / "valid.jsonl", [{"text": "v1"}, {"text": "v2"}])
    (folder / "notes.md").write_text("ignored", encoding="utf-8")

    train, valid, _ = load_examples(folder, None)

    assert len(train) == 6
    assert [example.text for example in valid] == ["v1", "v2"]


@pytest.mark.parametrize("valid_name", ["validation.csv", "dev.txt"])
def test_directory_validation_names(tmp_path, valid_name):
    folder = tmp_path / "corpus"
    folder.mkdir()
    paragraphs_file(folder / "train.txt", 4)
    valid_path = folder / valid_name
    if valid_name.endswith(".csv"):
        valid_path.write_text("text\nheld\n", encoding="utf-8")
    else:
        valid_path.write_text("held\n", encoding="utf-8")

    train, valid, _ = load_examples(folder, None)

    assert len(train) == 4
    assert valid == [Example(text="held")]


def test_directory_without_split_reads_all(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    paragraphs_file(folder / "a.txt", 10)
    paragraphs_file(folder / "b.txt", 10)

    train, valid, _ = load_examples(folder, None)

    assert len(train) + len(valid) == 20
    assert len(valid) == 1


def test_directory_without_data_files_raises(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "readme.md").write_text("nothing", encoding="utf-8")

    with pytest.raises(DataError, match="has no .txt, .jsonl, .csv files"):
        load_examples(folder, None)


def test_missing_data_path_raises(tmp_path):
    with pytest.raises(DataError, match="missing.txt not found"):
        load_examples(tmp_path / "missing.txt", None)


def test_missing_eval_path_raises(tmp_path):
    train_path = paragraphs_file(tmp_path / "train.txt", 4)

    with pytest.raises(DataError, match="missing.jsonl not found"):
        load_examples(train_path, tmp_path / "missing.jsonl")


def test_no_data_uses_shipped_corpus():
    train, valid, description = load_examples(None, None)

    assert description == "shipped Austen corpus"
    assert len(train) > len(valid) > 0


# Batching


def test_causal_blocks_fixed_length(wordpiece_tokenizer):
    examples = [Example(text="the cat sat on the mat and then the dog came in")] * 8

    data = TokenizedData(examples, wordpiece_tokenizer, Task.CAUSAL_LM, max_length=16)

    lengths = {len(item["input_ids"]) for item in data.items}
    assert lengths == {16}
    batch = data.batches(2, limit=1)[0]
    assert bool(batch["attention_mask"].all())
    assert torch.equal(batch["labels"], batch["input_ids"])


def test_blocks_separate_examples(wordpiece_tokenizer):
    examples = [Example(text="the cat"), Example(text="the dog")]

    data = TokenizedData(examples, wordpiece_tokenizer, Task.CAUSAL_LM, max_length=64)

    separator = wordpiece_tokenizer.sep_token_id
    ids = data.items[0]["input_ids"].tolist()
    assert ids.count(separator) == 2


def test_short_text_one_block(wordpiece_tokenizer):
    data = TokenizedData([Example(text="the cat")], wordpiece_tokenizer, Task.ENCODER, max_length=64)

    assert len(data) == 1
    assert len(data.items[0]["input_ids"]) < 64


def test_seq2seq_pairs_padded(wordpiece_tokenizer):
    examples = [Example(source=pair["source"], target=pair["target"]) for pair in corpus_pairs(3)]

    data = TokenizedData(examples, wordpiece_tokenizer, Task.SEQ2SEQ_LM, max_length=24)
    batch = data.batches(3)[0]

    target_lengths = [len(item["labels"]) for item in data.items]
    source_lengths = [len(item["input_ids"]) for item in data.items]
    assert len(data) == 3
    assert max(source_lengths) <= 24
    assert int(batch["attention_mask"].sum()) == sum(source_lengths)
    assert int((batch["labels"] != -100).sum()) == sum(target_lengths)
    assert int(batch["input_ids"][batch["attention_mask"] == 0].ne(wordpiece_tokenizer.pad_token_id).sum()) == 0


def test_seq2seq_plain_text_reconstructs(wordpiece_tokenizer):
    data = TokenizedData([Example(text="the cat sat")], wordpiece_tokenizer, Task.SEQ2SEQ_LM, max_length=16)

    assert torch.equal(data.items[0]["input_ids"], data.items[0]["labels"])


def test_causal_padding_labels_ignored(wordpiece_tokenizer):
    data = TokenizedData([Example(text="the cat")], wordpiece_tokenizer, Task.CAUSAL_LM, max_length=64)
    short = {"input_ids": torch.tensor([5, 6])}

    batch = data.collate([data.items[0], short])

    assert batch["labels"][1, 2:].tolist() == [-100] * (batch["labels"].shape[1] - 2)
    assert batch["attention_mask"][1].tolist()[:2] == [1, 1]


def test_batches_limit(wordpiece_tokenizer):
    data = TokenizedData([Example(text="the cat sat on the mat " * 40)], wordpiece_tokenizer, Task.CAUSAL_LM, max_length=8)

    assert len(data.batches(2, limit=3)) == 3


def test_shuffled_batches_seeded(wordpiece_tokenizer):
    data = TokenizedData(
        [Example(text="the cat sat on the mat and the dog " * 20)], wordpiece_tokenizer, Task.CAUSAL_LM, max_length=8
    )

    first = [next(data.shuffled_batches(3, seed=5))["input_ids"] for _ in range(2)]
    stream = data.shuffled_batches(3, seed=5)
    batches = [next(stream) for _ in range(3 * len(data))]

    assert torch.equal(first[0], first[1])
    assert {batch["input_ids"].shape[0] for batch in batches} == {3}
