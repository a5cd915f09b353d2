"""DeepSpeed ZeRO check (not part of the test suite: DeepSpeed is not a dependency); see scripts/check_deepspeed.sh.

    torchrun --nproc_per_node 2 tests/workers/deepspeed_worker.py --model DIR --method peqa --stage 2 --out DIR

Wraps a PEQA (AdamW) or QFT (IntLion) model with ``deepspeed.initialize`` at ZeRO stage ``--stage`` on the CPU
accelerator with gloo, trains two steps (rank r takes rows 2r, 2r+1 of a global batch of 4) and writes
``rank<R>.json`` with the losses, or the error that stopped it.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import peqa_peft  # noqa: E402,F401  (registers PEQA and QFT)
from peqa_peft import IntLion, PeqaConfig, QftConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--method", choices=["peqa", "qft"], required=True)
    parser.add_argument("--stage", type=int, choices=[1, 2, 3], required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    if args.method == "peqa":
        model = get_peft_model(model, PeqaConfig(bits=4, task_type="CAUSAL_LM"))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    else:
        model = get_peft_model(model, QftConfig(task_type="CAUSAL_LM"))
        optimizer = IntLion.from_model(model, lr=1e-3)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": args.stage},
        "zero_allow_untested_optimizer": True,
    }
    result: dict = {"rank": rank, "method": args.method, "stage": args.stage, "deepspeed": deepspeed.__version__}
    try:
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        ids = torch.randint(0, 4096, (4, 16), generator=torch.Generator().manual_seed(1))[2 * rank : 2 * rank + 2]
        result["losses"] = []
        for _ in range(2):
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            result["losses"].append(loss.item())
    except Exception as err:  # noqa: BLE001  (recorded: the point is to see what happens)
        result["error"] = f"{type(err).__name__}: {err}"
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
