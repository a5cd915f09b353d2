#!/usr/bin/env bash
# Reproduces the README's results table on the bundled model: WikiText-2 and PTB test perplexity of the fp model,
# RTN 4/3-bit, PEQA 4/3-bit, LoRA (fp base) and QFT after the same Alpaca fine-tuning, via the peqa-peft CLI.
#
#   bash examples/reproduce_results.sh [OUTPUT_DIR] [STEPS]
#
# Perplexity: full test splits, 256-token non-overlapping windows (the demo model's training context).
set -euo pipefail
OUT=${1:-outputs/results}
STEPS=${2:-100}
MODEL=assets/demo-llama
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
TRAIN=(--model "$MODEL" --dataset assets/data/alpaca_data_5000.json --max-steps "$STEPS" --batch-size 8
       --seq-len 256 --seed 0 --logging-steps 25 --eval wikitext2,ptb --no-progress)

for ds in wikitext2 ptb; do
  peqa-peft eval --model "$MODEL" --dataset "$ds" --seq-len 256 --json --no-progress | tail -n 1 > "$OUT/fp_$ds.json"
  for bits in 4 3; do
    peqa-peft eval --model "$MODEL" --dataset "$ds" --seq-len 256 --bits "$bits" --quant-method minmax --json \
      --no-progress | tail -n 1 > "$OUT/rtn${bits}_$ds.json"
  done
done
peqa-peft train --method peqa --bits 4 --output-dir "$OUT/peqa4" "${TRAIN[@]}"
peqa-peft train --method peqa --bits 3 --output-dir "$OUT/peqa3" "${TRAIN[@]}"
peqa-peft train --method lora --output-dir "$OUT/lora" "${TRAIN[@]}"
peqa-peft train --method qft --output-dir "$OUT/qft" "${TRAIN[@]}"

python - "$OUT" "$STEPS" <<'PY'
import json, sys
from pathlib import Path
out, steps = Path(sys.argv[1]), sys.argv[2]
def static(name):
    return {ds: json.loads((out / f"{name}_{ds}.json").read_text())["perplexity"] for ds in ("wikitext2", "ptb")}
def trained(name):
    s = json.loads((out / name / "train_summary.json").read_text())
    return {ds: s["eval"][ds]["perplexity"] for ds in ("wikitext2", "ptb")}
rows = [
    ("fp32, no tuning", "32", static("fp")),
    ("RTN 4-bit (min-max, per channel), no tuning", "4", static("rtn4")),
    ("RTN 3-bit (min-max, per channel), no tuning", "3", static("rtn3")),
    (f"PEQA 4-bit per channel, {steps} Alpaca steps", "4", trained("peqa4")),
    (f"PEQA 3-bit per channel, {steps} Alpaca steps", "3", trained("peqa3")),
    (f"LoRA r8 all-linear on fp32, {steps} Alpaca steps", "32", trained("lora")),
    (f"QFT + IntLion (int8 + 1% outliers), {steps} Alpaca steps", "8", trained("qft")),
]
lines = ["| model | weight bits | WikiText-2 ppl | PTB ppl |", "|---|---|---|---|"]
lines += [f"| {n} | {b} | {p['wikitext2']:.2f} | {p['ptb']:.2f} |" for n, b, p in rows]
(out / "results_table.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
