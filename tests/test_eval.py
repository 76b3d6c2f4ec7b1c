"""`tbquant eval`: each metric on tiny models and real text, checked against the libraries that
define it, and the command line's table, JSON file, model card update and errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import sacrebleu
import torch
from huggingface_hub import EvalResult, ModelCard
from rouge_score import rouge_scorer
from support import CORPUS_FOLDER, PAIRS_FILE, compress_settings, corpus_pairs, run_cli, write_training_data
from test_cli import assert_one_line_error, snapshot

import tbquant
from tbquant.data import read_file
from tbquant.metrics import EvalSettings, choose_metrics, data_kind, load_for_eval, run_evaluation
from tbquant.metrics.generation import GenerationSettings, PromptSettings
from tbquant.metrics.perplexity import sliding_windows
from tbquant.metrics.rouge import rouge, split_sentences
from tbquant.metrics.translation import bleu_and_chrf

VALID_TEXT = CORPUS_FOLDER / "austen_valid.txt"
SHORT_GENERATION = GenerationSettings(num_beams=1, max_new_tokens=6, batch_size=2)


@pytest.fixture(scope="module")
def llama_export(tiny_model, tmp_path_factory) -> Path:
    """A ternary/A8 export of the tiny Llama model after two distillation steps."""
    model_dir = tiny_model("llama")
    folder = tmp_path_factory.mktemp("llama-export")
    train, valid = write_training_data(folder / "data", model_dir, "causal-lm")
    tbquant.run_pipeline(compress_settings(model_dir, folder / "export", train, valid, steps=2))
    return folder / "export"


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return path


def paragraphs(count: int) -> list:
    return read_file(VALID_TEXT)[:count]


# Perplexity


def guide_perplexity(model, token_ids: torch.Tensor, window: int, stride: int) -> tuple[float, int]:
    """The loop of the transformers perplexity guide, with the loss of each window weighted by the
    number of tokens it scores (the labels that remain after the model's one-token shift)."""
    nll_sum, scored_tokens, previous_end = 0.0, 0, 0
    length = token_ids.size(1)
    for begin in range(0, length, stride):
        end = min(begin + window, length)
        target_length = end - previous_end
        input_ids = token_ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-target_length] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        count = int((target_ids[:, 1:] != -100).sum())
        nll_sum += loss.item() * count
        scored_tokens += count
        previous_end = end
        if end == length:
            break
    return math.exp(nll_sum / scored_tokens), scored_tokens


@pytest.mark.parametrize("window, stride", [(32, 16), (32, 32), (24, 7)])
def test_perplexity_matches_guide_loop(tiny_model, window, stride):
    student = load_for_eval(str(tiny_model("llama")))
    examples = paragraphs(4)
    report = run_evaluation(student, None, examples, ["perplexity"], EvalSettings(window=window, stride=stride, batch_size=3))

    text = "\n\n".join(example.text for example in examples)
    token_ids = student.tokenizer(text, return_tensors="pt")["input_ids"]
    expected, scored_tokens = guide_perplexity(student.model, token_ids, window, stride)

    assert report.scores["student"]["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert report.counts["scored_tokens"] == scored_tokens
    if stride < window:
        assert scored_tokens == token_ids.size(1) - 1


def test_sliding_windows_score_each_token_once():
    windows = sliding_windows(list(range(100)), window=30, stride=20)

    scored = torch.cat([window.input_ids[window.labels != -100] for window in windows]).tolist()
    assert scored == list(range(100))
    assert all(window.input_ids.shape[1] <= 30 for window in windows)


def test_seq2seq_perplexity_matches_model_loss(tiny_model):
    student = load_for_eval(str(tiny_model("bart")))
    examples = read_file(PAIRS_FILE)[:3]
    report = run_evaluation(student, None, examples, ["perplexity"], EvalSettings(batch_size=2))

    nll_sum, tokens = 0.0, 0
    for example in examples:
        encoded = student.tokenizer(example.source, text_target=example.target, return_tensors="pt")
        with torch.no_grad():
            loss = student.model(**encoded).loss
        nll_sum += loss.item() * encoded["labels"].numel()
        tokens += encoded["labels"].numel()

    assert report.scores["student"]["perplexity"] == pytest.approx(math.exp(nll_sum / tokens), rel=1e-5)


# Agreement


def test_agreement_matches_direct_computation(tiny_model, llama_export):
    student = load_for_eval(str(llama_export))
    teacher = load_for_eval(str(tiny_model("llama")))
    examples = paragraphs(1)
    report = run_evaluation(student, teacher, examples, ["agreement", "perplexity"], EvalSettings(window=128, stride=128))

    token_ids = teacher.tokenizer(examples[0].text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        student_logits = student.model(token_ids).logits[0, :-1]
        teacher_logits = teacher.model(token_ids).logits[0, :-1]
    student_log_probs = torch.log_softmax(student_logits, -1)
    teacher_log_probs = torch.log_softmax(teacher_logits, -1)
    kl = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(-1).mean().item()
    top1 = (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean().item() * 100

    assert token_ids.shape[1] <= 128  # one window covers the paragraph
    assert report.agreement["top1_agreement"] == pytest.approx(top1)
    assert report.agreement["mean_kl"] == pytest.approx(kl, rel=1e-4)
    assert report.agreement["mean_kl"] > 0
    assert report.scores["student"]["perplexity"] != report.scores["teacher"]["perplexity"]


def test_agreement_of_model_with_itself(tiny_model):
    model = load_for_eval(str(tiny_model("gpt2")))
    report = run_evaluation(model, model, paragraphs(2), ["agreement"], EvalSettings(window=32, stride=16))

    assert report.agreement["top1_agreement"] == 100.0
    assert report.agreement["mean_kl"] == pytest.approx(0.0, abs=1e-6)


def test_agreement_of_masked_lm_encoder(tiny_model):
    model = load_for_eval(str(tiny_model("bert-mlm")))

    assert choose_metrics(None, model, model, "text") == ["agreement"]
    report = run_evaluation(model, model, paragraphs(2), ["agreement"], EvalSettings(window=32, stride=32))
    assert report.agreement["top1_agreement"] == 100.0
    assert report.counts["compared_positions"] > 0


# ROUGE


SUMMARIES = [
    ("The cats were sitting on the mats. They purred loudly.", "A cat sat on the mat. It was purring."),
    ("Elizabeth walked to Netherfield through the mud.", "Elizabeth walks through muddy fields to Netherfield! Her petticoat was dirty."),
]


def test_rouge_matches_rouge_score():
    predictions = [prediction for prediction, _ in SUMMARIES]
    references = [reference for _, reference in SUMMARIES]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    direct = [scorer.score(reference.replace(". ", ".\n").replace("! ", "!\n"), prediction.replace(". ", ".\n")) for prediction, reference in SUMMARIES]

    scores = rouge(predictions, references)

    for name in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert scores[name] == pytest.approx(100 * sum(score[name].fmeasure for score in direct) / len(direct))
    assert scores["rouge1"] > scores["rouge2"] > 0


def test_split_sentences_for_rouge_lsum():
    assert split_sentences("One. Two! “Three?” Four") == "One.\nTwo!\n“Three?”\nFour"


def test_rouge_of_seq2seq_generation(tiny_model, tmp_path):
    pairs = [{"article": pair["source"] + " " + pair["source"], "summary": pair["source"]} for pair in corpus_pairs(3)]
    examples = read_file(write_jsonl(tmp_path / "summaries.jsonl", pairs))
    student = load_for_eval(str(tiny_model("bart")))
    settings = EvalSettings(generation=SHORT_GENERATION)

    assert data_kind(examples) == "summarization"
    assert choose_metrics(None, student, None, "summarization") == ["perplexity", "rouge"]
    report = run_evaluation(student, None, examples, ["rouge"], settings)

    predictions = report.predictions["student"]
    expected = rouge(predictions, [example.target for example in examples])
    assert len(predictions) == 3
    assert all(prediction for prediction in predictions)
    assert report.scores["student"] == expected


# BLEU and chrF


def test_bleu_and_chrf_match_sacrebleu():
    pairs = corpus_pairs(4, start=20)
    references = [pair["target"] for pair in pairs]
    predictions = [reference.replace("Jehová", "Yahweh") for reference in references[:3]] + ["La carga que vió."]

    scores = bleu_and_chrf(predictions, references)

    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [references]).score)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(predictions, [references]).score)
    assert 0 < scores["bleu"] < 100


def test_translation_with_few_shot_prompt(tiny_model):
    examples = read_file(PAIRS_FILE)[:4]
    student = load_for_eval(str(tiny_model("llama")))
    prompt = PromptSettings(template="English: {source}\nSpanish:", few_shot=examples[:1])
    settings = EvalSettings(generation=SHORT_GENERATION, prompt=prompt)

    assert data_kind(examples) == "translation"
    report = run_evaluation(student, None, examples[1:], ["bleu", "chrf"], settings)

    predictions = report.predictions["student"]
    references = [example.target for example in examples[1:]]
    assert len(predictions) == 3
    assert all("\n" not in prediction for prediction in predictions)
    assert report.scores["student"]["bleu"] == sacrebleu.corpus_bleu(predictions, [references]).score
    assert report.scores["student"]["chrf"] == sacrebleu.corpus_chrf(predictions, [references]).score


def test_prompt_puts_examples_first():
    examples = read_file(PAIRS_FILE)[:2]
    prompt = PromptSettings(template="English: {source}\nSpanish:", few_shot=examples)

    text = prompt.build("In the beginning.", tokenizer=None)

    assert text.startswith(f"English: {examples[0].source}\nSpanish: {examples[0].target}\n\nEnglish: {examples[1].source}")
    assert text.endswith("\n\nEnglish: In the beginning.\nSpanish:")


def test_chat_prompt_uses_template(bpe_tokenizer):
    prompt = PromptSettings(template="English: {source}\nSpanish:", chat=True)

    text = prompt.build("In the beginning.", bpe_tokenizer)

    assert "<|im_start|>user\nEnglish: In the beginning.\nSpanish:<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


# Command line


@pytest.fixture(scope="module")
def cli_eval(tiny_model, llama_export, tmp_path_factory):
    """Run `tbquant eval EXPORT --teacher MODEL --json ... --update-card` on the shipped text."""
    folder = tmp_path_factory.mktemp("cli-eval")
    card_before = (llama_export / "README.md").read_text(encoding="utf-8")
    result = run_cli(
        "eval", str(llama_export), "--teacher", str(tiny_model("llama")), "--data", str(VALID_TEXT), "--limit", "3",
        "--window", "32", "--stride", "16", "--json", str(folder / "scores.json"), "--update-card",
        "--dataset-name", "austen", "--dataset-split", "valid",
    )
    return result, folder / "scores.json", card_before


def test_eval_prints_side_by_side_table(cli_eval):
    result, _, _ = cli_eval

    assert result.returncode == 0, result.stderr
    assert "teacher: llama" in result.stdout
    assert "retention" in result.stdout
    assert "top-1 agreement with teacher (%)" in result.stdout
    assert "perplexity" in result.stdout


def test_eval_json_file(cli_eval, llama_export):
    _, json_path, _ = cli_eval
    record = json.loads(json_path.read_text(encoding="utf-8"))
    student, teacher = record["results"]["student"]["perplexity"], record["results"]["teacher"]["perplexity"]

    assert record["tbquant_version"] == tbquant.__version__
    assert record["model"] == {"path": str(llama_export), "task": "causal-lm", "tbquant_export": True}
    assert record["teacher"]["tbquant_export"] is False
    assert record["metrics"] == ["perplexity", "agreement"]
    assert record["settings"]["window"] == 32
    assert record["settings"]["limit"] == 3
    assert set(record["agreement"]) == {"top1_agreement", "mean_kl"}
    assert record["retention"]["perplexity"] == pytest.approx(100 * teacher / student)
    assert record["counts"]["examples"] == 3


def test_eval_updates_model_card(cli_eval, llama_export):
    _, _, card_before = cli_eval
    results = json.loads((llama_export / "eval_results.json").read_text(encoding="utf-8"))
    card = ModelCard.load(llama_export / "README.md")

    assert {result["metric_type"] for result in results} == {"perplexity", "top1_agreement", "mean_kl"}
    assert all(EvalResult(**result).dataset_name == "austen" for result in results)
    assert card.data.model_name == "export"
    assert {result.metric_type for result in card.data.eval_results} == {"perplexity", "top1_agreement", "mean_kl"}
    # The card is re-rendered from the export: the text before the evaluation section is
    # unchanged, and the results now appear in the body as well as in the model-index.
    before = ModelCard(card_before).text
    assert card.text.split("## Evaluation")[0] == before.split("## Evaluation")[0]
    assert "| Text generation | austen |" in card.text
    assert card.data.library_name == "tbquant"
    assert not list(llama_export.glob(".*"))


def test_update_card_replaces_same_figure(llama_export, tmp_path):
    from tbquant.model_card import update_eval_results

    export = tmp_path / "export"
    export.mkdir()
    (export / "README.md").write_text((llama_export / "README.md").read_text(encoding="utf-8"), encoding="utf-8")
    first = {"task_type": "translation", "dataset_type": "bible", "dataset_name": "bible", "metric_type": "bleu", "metric_value": 1.0}
    other = {**first, "metric_type": "chrf", "metric_value": 20.0}

    update_eval_results(export, [first, other], "export")
    stored = update_eval_results(export, [{**first, "metric_value": 2.0}], "export")

    assert sorted((result["metric_type"], result["metric_value"]) for result in stored) == [("bleu", 2.0), ("chrf", 20.0)]
    assert len(ModelCard.load(export / "README.md").data.eval_results) == 2


# Bad input


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("columns.jsonl", '{"question": "Who?", "answer": "Emma."}\n', "no text column"),
        ("empty.txt", "\n\n", "contains no text"),
    ],
)
def test_bad_data(tiny_model, tmp_path, name, content, message):
    data = tmp_path / name
    data.write_text(content, encoding="utf-8")
    before = snapshot(tmp_path)

    result = run_cli("eval", str(tiny_model("llama")), "--data", str(data))

    assert_one_line_error(result, name, message)
    assert snapshot(tmp_path) == before


def test_unknown_metric(tiny_model):
    result = run_cli("eval", str(tiny_model("llama")), "--data", str(VALID_TEXT), "--metric", "bertscore")

    assert_one_line_error(result, "bertscore", "invalid --metric", "perplexity")


def test_rouge_on_encoder(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"article": "A long text about Emma.", "summary": "Emma."}])

    result = run_cli("eval", str(tiny_model("bert")), "--data", str(data), "--metric", "rouge")

    assert_one_line_error(result, "rouge", "encoder", "generates text")


def test_generation_metric_on_text_data(tiny_model):
    student = load_for_eval(str(tiny_model("llama")))

    with pytest.raises(tbquant.errors.DataError, match="bleu needs source/target pairs"):
        choose_metrics(["bleu"], student, None, "text")


def test_update_card_needs_export(tiny_model, tmp_path):
    result = run_cli("eval", str(tiny_model("llama")), "--data", str(VALID_TEXT), "--update-card", "--json", str(tmp_path / "out.json"))

    assert_one_line_error(result, "--update-card", "not")
    assert not (tmp_path / "out.json").exists()
