"""Worker of tests/test_distributed.py: a PEFT model under FSDP2 (``fully_shard``), 2 ranks, gloo, CPU.

    torchrun --nproc_per_node 2 tests/workers/fsdp2_worker.py --model DIR --method peqa --out DIR

Shards every decoder layer and the root, trains two steps and saves the adapter the FSDP2 way: the sharded state
dict is gathered into full tensors on CPU (``get_model_state_dict(..., full_state_dict=True, cpu_offload=True)``)
and rank 0 hands it to ``save_pretrained(state_dict=...)``. QFT is refused by FSDP2 (see the README); with
``--method qft`` the worker records the error it gets.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from peft import get_peft_model  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import peqa_peft  # noqa: E402,F401  (registers PEQA and QFT)
from peqa_peft import PeqaConfig, QftConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--method", choices=["peqa", "qft"], default="peqa")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    config = PeqaConfig(bits=4, task_type="CAUSAL_LM") if args.method == "peqa" else QftConfig(task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    result: dict = {"rank": rank}
    try:
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        ids = torch.randint(0, 4096, (4, 16), generator=torch.Generator().manual_seed(1))[2 * rank : 2 * rank + 2]
        losses = []
        for _ in range(2):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        model.eval()
        probe = torch.arange(16).view(1, 16)
        with torch.no_grad():
            logits = model(input_ids=probe).logits  # a collective under FSDP2: every rank runs it
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            model.save_pretrained(Path(args.out, "adapter"), state_dict=full)
            torch.save(logits, Path(args.out, "logits.pt"))
        result["losses"] = losses
    except Exception as err:  # noqa: BLE001  (recorded for the test, which checks the message)
        result["error"] = f"{type(err).__name__}: {err}"
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
