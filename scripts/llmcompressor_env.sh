#!/usr/bin/env bash
# Create the virtualenv that runs llm-compressor (the writer of the compressed-tensors checkpoints PEQA adopts).
#
# llm-compressor 0.14.0.1 pins transformers<=5.17 and compressed-tensors==0.19.0, which clash with this project's
# transformers 5.23 / compressed-tensors 0.20, so it lives in its own environment outside the repository.
# Usage: bash scripts/llmcompressor_env.sh [VENV_DIR]   (default /work/venvs/llmc)
set -euo pipefail
VENV="${1:-/work/venvs/llmc}"
python3 -m venv "$VENV"
# CPU torch first, so pip does not pull a multi-GB CUDA build as llm-compressor's dependency.
"$VENV/bin/pip" install --quiet torch==2.13.0
"$VENV/bin/pip" install --quiet llmcompressor==0.14.0.1
"$VENV/bin/python" -c "import llmcompressor, compressed_tensors, transformers; print('llmcompressor', llmcompressor.__version__, 'compressed-tensors', compressed_tensors.__version__, 'transformers', transformers.__version__)"
