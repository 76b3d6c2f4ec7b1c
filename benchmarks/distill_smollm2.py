"""Benchmark: SmolLM2-135M-Instruct compressed to ternary/A8 and binary/A8 on Jane Austen.

Measures, on one machine and in one run:

- validation perplexity of the fp32 teacher, of plain post-training quantization (0 steps), and
  of the distilled student at two step budgets (the first budget is read from the validation
  done at that step of the longer run, so its learning rate had not fully decayed yet);
- seconds per distillation step against seconds per step of plain full-precision fine-tuning
  (cross-entropy on the labels, AdamW) at the same batch;
- export size on disk, bits per quantized weight, and the weights file against fp32.

Usage (train on train.txt, measure on the first `--eval-blocks` blocks of valid.txt):

    python benchmarks/distill_smollm2.py --corpus ../shared/corpora/austen --steps 50 150 --json results.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tbquant.config import ActivationQuantConfig, QuantizationConfig, WeightQuantConfig
from tbquant.evaluation import evaluate
from tbquant.pipeline.runner import run_pipeline
from tbquant.pipeline.settings import CompressSettings, DistillSettings

logger = logging.getLogger("benchmark")


def smollm2_path() -> str:
    script = Path(__file__).resolve().parent.parent / "scripts" / "smollm2_path.py"
    return subprocess.run([sys.executable, str(script)], check=True, capture_output=True, text=True).stdout.strip()


def full_precision_step_seconds(state, steps: int, batch_size: int) -> float:
    """Time plain fp32 fine-tuning steps of the teacher's weights at the same batch size."""
    import copy

    model = copy.deepcopy(state.teacher).requires_grad_(True).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batches = state.train_data.shuffled_batches(batch_size, seed=1)
    durations = []
    for _ in range(steps + 1):
        batch = next(batches)
        started = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        durations.append(time.perf_counter() - started)
    del model, optimizer
    return sum(durations[1:]) / steps  # the first step includes one-off allocation


def run_config(name: str, scheme: str, args, model_path: str, output_root: Path) -> dict:
    settings = CompressSettings(
        model=model_path,
        output=output_root / name,
        quantization=QuantizationConfig(weights=WeightQuantConfig(scheme=scheme), activations=ActivationQuantConfig(bits=8)),
        distill=DistillSettings(
            steps=max(args.steps),
            batch_size=args.batch_size,
            max_length=args.max_length,
            lr=args.lr,
            eval_every=min(args.steps),
            eval_batches=args.eval_blocks // args.batch_size,
            seed=args.seed,
        ),
        data=args.corpus / "train.txt",
        eval_data=args.corpus / "valid.txt",
    )
    state = run_pipeline(settings)
    evaluations = {record["step"]: record for record in state.history if "eval_perplexity" in record}
    result = {
        "config": name,
        "teacher_perplexity": state.metrics["teacher_perplexity"],
        "ptq_perplexity": state.metrics["initial_perplexity"],
        "distilled_perplexity": {str(step): evaluations[step]["eval_perplexity"] for step in args.steps if step in evaluations},
        "distill_seconds_per_step": state.info["distill_seconds_per_step"],
        "bits_per_weight": state.info["bits_per_weight"],
        "code_bits_per_weight": state.info["code_bits_per_weight"],
        "export_weights_bytes": state.info["export_weights_bytes"],
        "fp32_bytes": state.info["fp32_bytes"],
        "export_dir_bytes": sum(path.stat().st_size for path in (output_root / name).iterdir()),
    }
    if args.fp_steps:
        result["fp_finetune_seconds_per_step"] = full_precision_step_seconds(state, args.fp_steps, args.batch_size)
    # The packed export must score what the student scored at the end of training.
    check = evaluate(state.model, state.eval_data.batches(args.batch_size, limit=2), state.task)
    result["packed_perplexity_2_batches"] = check.get("perplexity")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path("../shared/corpora/austen"), help="folder with train.txt and valid.txt")
    parser.add_argument("--steps", type=int, nargs=2, default=[50, 150], help="two step budgets, smaller first")
    parser.add_argument("--configs", nargs="+", default=["ternary", "binary"], help="weight schemes to run, each with 8-bit activations")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2.5e-4)
    parser.add_argument("--eval-blocks", type=int, default=64, help="validation blocks of --max-length tokens")
    parser.add_argument("--fp-steps", type=int, default=5, help="steps of full-precision fine-tuning to time (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--keep-exports", type=Path, help="keep the exports in this folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    model_path = smollm2_path()
    results = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}, "runs": []}
    with tempfile.TemporaryDirectory() as scratch:
        output_root = args.keep_exports or Path(scratch)
        output_root.mkdir(parents=True, exist_ok=True)
        for scheme in args.configs:
            result = run_config(f"smollm2-{scheme}-a8", scheme, args, model_path, output_root)
            logger.info("%s", json.dumps(result))
            results["runs"].append(result)
            if args.json:
                args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
