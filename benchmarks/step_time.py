"""Benchmark: seconds per distillation step against plain full-precision fine-tuning.

Loads SmolLM2-135M-Instruct, then times, on the same batches, `--steps` optimizer steps of:

- fp32 fine-tuning (cross-entropy on the labels, AdamW);
- tbquant distillation for each weight scheme with 8-bit activations (teacher forward, student
  forward and backward with all loss terms, AdamW).

The first step of each is a warm-up and is not counted.

    python benchmarks/step_time.py --steps 5 --batch-size 4 --max-length 128
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch

from tbquant.config import ActivationQuantConfig, QuantizationConfig, WeightQuantConfig
from tbquant.evaluation import forward
from tbquant.losses import distillation_loss
from tbquant.nn.convert import prepare_student
from tbquant.pipeline.runner import run_pipeline
from tbquant.pipeline.settings import CompressSettings, DistillSettings
from tbquant.stages.calibrate import calibrate

from distill_smollm2 import smollm2_path


def timed_steps(step, count: int) -> float:
    durations = []
    for _ in range(count + 1):
        started = time.perf_counter()
        step()
        durations.append(time.perf_counter() - started)
    return sum(durations[1:]) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--schemes", nargs="+", default=["ternary", "binary"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    distill_settings = DistillSettings(batch_size=args.batch_size, max_length=args.max_length, eval_batches=0)
    state = run_pipeline(CompressSettings(model=smollm2_path(), output=Path("unused"), distill=distill_settings), ["load"])
    batches = state.train_data.batches(args.batch_size, limit=args.steps + 1)
    results = {"batch_size": args.batch_size, "max_length": args.max_length, "threads": torch.get_num_threads()}

    model = copy.deepcopy(state.teacher).requires_grad_(True).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    iterator = iter(batches)

    def fine_tune_step() -> None:
        model(**next(iterator)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    results["fp32_finetune_seconds_per_step"] = timed_steps(fine_tune_step, args.steps)
    del model, optimizer

    for scheme in args.schemes:
        student = copy.deepcopy(state.teacher).requires_grad_(True)
        config = QuantizationConfig(weights=WeightQuantConfig(scheme=scheme), activations=ActivationQuantConfig(bits=8))
        prepare_student(student, config)
        calibrate(student, batches[:1], state.task)
        student.train()
        optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3)
        iterator = iter(batches)

        def distill_step() -> None:
            batch = next(iterator)
            with torch.no_grad():
                teacher_outputs = forward(state.teacher, batch, state.task, True, labels=False)
            student_outputs = forward(student, batch, state.task, True, labels=False)
            distillation_loss(student_outputs, teacher_outputs, batch, state.task, distill_settings).total.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        results[f"{scheme}_a8_distill_seconds_per_step"] = timed_steps(distill_step, args.steps)
        del student, optimizer

    text = json.dumps(results, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
