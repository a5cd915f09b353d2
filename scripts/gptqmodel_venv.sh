#!/usr/bin/env bash
# Throwaway virtualenv for trying GPTQModel as a consumer of `peqa-peft export --format gptq` on CPU.
# GPTQModel pins its own torch/transformers, so it never goes into the project venv.
# Usage: bash scripts/gptqmodel_venv.sh [/work/venvs/gptqmodel]
set -euo pipefail
VENV=${1:-/work/venvs/gptqmodel}
python3 -m venv "$VENV"
. "$VENV/bin/activate"
pip install torch==2.13.0  # the CPU wheel from the local wheel directory
pip install gptqmodel
python -c "import gptqmodel; print('gptqmodel', gptqmodel.__version__)"
