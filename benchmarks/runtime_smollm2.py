"""Benchmark: SmolLM2 fp32 teacher against its packed tbquant exports, side by side in one run.

For each model, a fresh subprocess loads it and measures:

- load time, and peak resident memory while loading (`VmHWM`) minus the resident memory of
  the process before loading (interpreter, torch, transformers and the model's modeling code);
- resident memory of the loaded model: resident memory after loading and one 16-token forward
  pass (which reads every weight of a memory-mapped checkpoint) minus before;
- decode tokens per second at batch 1: `--decode-tokens` single-token forward passes with the KV
  cache after a 16-token prompt;
- prefill tokens per second at batch `--prefill-batch` x `--prefill-length`: the median of
  three forward passes without cache, after a warm-up pass;
- bits per weight of the quantized layers (codes, and codes plus scales) and the weights file size.

Models load in float32 unless an export is given as NAME=DIRECTORY:DTYPE: then its
full-precision tensors (embeddings, norms, head) and activations use DTYPE, while the quantized
layers still compute from their codes.

The teacher is first converted from the GGUF file to an fp32 `save_pretrained` directory in
`--workdir`, so that all models load from safetensors. Results are printed as a markdown table
with ratios against the teacher and written as JSON to `--json`.

    python benchmarks/runtime_smollm2.py "$(python scripts/smollm2_path.py)" \\
        ternary-a8=path/to/smollm2-ternary-a8 binary-a8=path/to/smollm2-binary-a8 --json runtime.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEACHER = "fp32"

# Prefill passes timed per model; the median is reported, so that one pass slowed by another
# process does not decide the figure.
PREFILL_REPEATS = 3


def resident_bytes() -> int:
    """Return the current resident set size of this process (Linux `/proc/self/statm`)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    """Return the peak resident set size of this process (`VmHWM`; unlike `ru_maxrss`, it does
    not carry over the parent's peak into a child started with fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def convert_teacher(gguf: Path, folder: Path) -> Path:
    """Write the GGUF teacher as an fp32 safetensors directory (once) and return it."""
    if (folder / "model.safetensors").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantized to fp32 on load; dropping the GGUF quantizer lets them be saved.
    model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def quantized_layer_bits(model) -> dict[str, float]:
    """Return the quantized weights' count and bits per weight as stored on disk."""
    from tbquant import packing
    from tbquant.nn import PackedLinear

    weights, code_bytes, scale_bytes = 0, 0, 0
    for module in model.modules():
        if not isinstance(module, PackedLinear):
            continue
        weights += module.out_features * module.in_features
        code_bytes += packing.packed_bytes(module.out_features, module.in_features, module.layout, module.format_version)
        scale_bytes += module.weight_scale.numel() * module.weight_scale.element_size()
        if module.weight_offset is not None:
            scale_bytes += module.weight_offset.numel() * module.weight_offset.element_size()
    if not weights:
        return {}
    return {
        "quantized_weights": weights,
        "code_bits_per_weight": 8 * code_bytes / weights,
        "bits_per_weight": 8 * (code_bytes + scale_bytes) / weights,
    }


def measure(path: Path, dtype_name: str, decode_tokens: int, prefill_batch: int, prefill_length: int, threads: int) -> dict:
    """Load the model at `path` in this process and measure it (the worker side)."""
    import torch
    import transformers

    import tbquant  # noqa: F401  (registers the quantizer with transformers)

    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    # Import the modeling code before the baseline, so that the model's memory excludes it.
    config = transformers.AutoConfig.from_pretrained(path)
    transformers.AutoModelForCausalLM._model_mapping[type(config)]
    gc.collect()
    baseline = resident_bytes()

    started = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype_name)).eval()
    load_seconds = time.perf_counter() - started
    from tbquant.nn import native

    result = {
        "fused_kernels": native.library() is not None,
        "load_seconds": load_seconds,
        "peak_load_bytes": peak_resident_bytes() - baseline,
        "file_bytes": (path / "model.safetensors").stat().st_size,
        **quantized_layer_bits(model),
    }

    generator = torch.Generator().manual_seed(0)
    vocabulary = model.config.vocab_size
    with torch.no_grad():
        prompt = torch.randint(0, vocabulary, (1, 16), generator=generator)
        outputs = model(input_ids=prompt, use_cache=True)
        cache, token = outputs.past_key_values, outputs.logits[:, -1:].argmax(-1)
        # Measured after one forward pass: a memory-mapped checkpoint is resident only once read.
        gc.collect()
        result["resident_bytes"] = resident_bytes() - baseline
        for _ in range(2):  # warm-up steps, not counted
            outputs = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = outputs.past_key_values, outputs.logits[:, -1:].argmax(-1)
        started = time.perf_counter()
        for _ in range(decode_tokens):
            outputs = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = outputs.past_key_values, outputs.logits[:, -1:].argmax(-1)
        result["decode_tokens_per_second"] = decode_tokens / (time.perf_counter() - started)

        batch = torch.randint(0, vocabulary, (prefill_batch, prefill_length), generator=generator)
        model(input_ids=batch[:1, :32], use_cache=False)
        seconds = []
        for _ in range(PREFILL_REPEATS):
            started = time.perf_counter()
            model(input_ids=batch, use_cache=False)
            seconds.append(time.perf_counter() - started)
        result["prefill_tokens_per_second"] = batch.numel() / statistics.median(seconds)
    return result


def run_worker(path: Path, dtype_name: str, arguments: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        str(path),
        "--dtype",
        dtype_name,
        "--decode-tokens",
        str(arguments.decode_tokens),
        "--prefill-batch",
        str(arguments.prefill_batch),
        "--prefill-length",
        str(arguments.prefill_length),
        "--threads",
        str(arguments.threads),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise SystemExit(f"measuring {path} failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


ROWS = [
    ("decode tokens/s, batch 1", "decode_tokens_per_second", "{:.1f}"),
    ("prefill tokens/s, batch {batch} x {length}", "prefill_tokens_per_second", "{:.0f}"),
    ("resident memory of the loaded model (MB)", "resident_bytes", "{:.1f}"),
    ("peak memory while loading (MB)", "peak_load_bytes", "{:.1f}"),
    ("load time (s)", "load_seconds", "{:.2f}"),
    ("weights file (MB)", "file_bytes", "{:.1f}"),
    ("bits per quantized weight, codes", "code_bits_per_weight", "{:.3f}"),
    ("bits per quantized weight, codes + scales", "bits_per_weight", "{:.3f}"),
]


def markdown_table(results: dict[str, dict], arguments: argparse.Namespace) -> str:
    names = list(results)
    lines = ["| measure | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    teacher = results[TEACHER]
    for label, key, form in ROWS:
        cells = []
        for name in names:
            value = results[name].get(key)
            if value is None:
                cells.append("-")
                continue
            shown = value / 1e6 if key.endswith("bytes") else value
            text = form.format(shown)
            if name != TEACHER and teacher.get(key):
                text += f" ({value / teacher[key]:.2f}x)"
            cells.append(text)
        lines.append(f"| {label.format(batch=arguments.prefill_batch, length=arguments.prefill_length)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("teacher", nargs="?", type=Path, help="SmolLM2 GGUF file (scripts/smollm2_path.py prints it)")
    parser.add_argument(
        "exports",
        nargs="*",
        help="NAME=DIRECTORY of each tbquant export to measure, or NAME=DIRECTORY:DTYPE to load its full-precision tensors in DTYPE (default float32)",
    )
    parser.add_argument("--decode-tokens", type=int, default=64, help="decode steps timed at batch 1")
    parser.add_argument("--prefill-batch", type=int, default=8, help="sequences in the prefill pass")
    parser.add_argument("--prefill-length", type=int, default=256, help="tokens per sequence in the prefill pass")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads for every model")
    parser.add_argument("--workdir", type=Path, help="directory for the fp32 teacher conversion (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="write the results as JSON to this file")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    arguments = parse_arguments()
    if arguments.worker is not None:
        print(json.dumps(measure(arguments.worker, arguments.dtype, arguments.decode_tokens, arguments.prefill_batch, arguments.prefill_length, arguments.threads)))
        return
    if arguments.teacher is None:
        raise SystemExit("missing teacher: pass the SmolLM2 GGUF file (python scripts/smollm2_path.py prints its path)")

    exports = {}
    for item in arguments.exports:
        name, separator, location = item.partition("=")
        directory, _, dtype_name = location.partition(":")
        if not separator or not Path(directory).is_dir():
            raise SystemExit(f"invalid export {item!r}: expected NAME=DIRECTORY of an existing tbquant export")
        exports[name] = (Path(directory), dtype_name or "float32")

    with tempfile.TemporaryDirectory() as temporary:
        workdir = arguments.workdir or Path(temporary)
        teacher = convert_teacher(arguments.teacher, workdir / "smollm2-fp32")
        results = {TEACHER: run_worker(teacher, "float32", arguments)}
        for name, (directory, dtype_name) in exports.items():
            results[name] = run_worker(directory, dtype_name, arguments)

    print(markdown_table(results, arguments))
    if arguments.json is not None:
        arguments.json.write_text(json.dumps({"settings": {key: str(value) for key, value in vars(arguments).items()}, "results": results}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
