#!/usr/bin/env bash
# Does DeepSpeed ZeRO train PEQA / QFT? DeepSpeed is not a dependency of peqa_peft: it is installed into a separate
# directory (no compiled ops, no dependency changes to the project venv) and put on PYTHONPATH for this check only.
# Each of PEQA and QFT runs 2 steps at ZeRO stages 2 and 3 on 2 CPU ranks (DeepSpeed's CPU accelerator, gloo).
# Usage: bash scripts/check_deepspeed.sh [DEEPSPEED_DIR] [OUT_DIR]     (from the repo root, project venv active)
set -euo pipefail
DS_DIR=${1:-/tmp/peqa-deepspeed}
OUT=${2:-/tmp/peqa-deepspeed-check}
if [ ! -d "$DS_DIR/deepspeed" ]; then
  DS_BUILD_OPS=0 python -m pip install --quiet --target "$DS_DIR" --no-deps \
    deepspeed==0.19.8 hjson ninja py-cpuinfo msgpack nvidia-ml-py einops
fi
port=29591
for method in peqa qft; do
  for stage in 2 3; do
    dir="$OUT/$method-zero$stage"
    mkdir -p "$dir"
    PYTHONPATH="$DS_DIR:$PWD" HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python -m torch.distributed.run \
      --nproc_per_node 2 --master_port $port tests/workers/deepspeed_worker.py \
      --model assets/demo-llama --method $method --stage $stage --out "$dir" > "$dir/log.txt" 2>&1 || true
    port=$((port + 1))
    cat "$dir"/rank*.json; echo
  done
done
