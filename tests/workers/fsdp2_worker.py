"""Worker of tests/test_distributed.py: a PEFT model under FSDP2 (``fully_shard``), 2 ranks, gloo, CPU.

    torchrun --nproc_per_node 2 tests/workers/fsdp2_worker.py --model DIR --method peqa --out DIR

Shards every decoder layer and the root, trains two steps (rank r takes rows 2r, 2r+1 of a global batch of 4) and
saves the adapter the FSDP2 way: the sharded state dict is gathered into full tensors on CPU
(``get_model_state_dict(..., full_state_dict=True, cpu_offload=True)``) and rank 0 hands it to
``save_pretrained(state_dict=...)``. PEQA trains with AdamW, QFT with IntLion (no clipping, so one step can be
replayed exactly in one process). Rank 0 also writes what the test compares with one process: the first step's
gathered gradients (``grads.pt``), the full state dict after that step (``step1.pt``) and the logits of a probe
(``logits.pt``). Every rank records how much of the integer storage it holds and its model-state bytes.
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
from peqa_peft import IntLion, PeqaConfig, QftConfig  # noqa: E402
from peqa_peft.tuners.qft import QftWeight  # noqa: E402

QFT_LR = 1e-3
GLOBAL_BATCH = torch.randint(0, 4096, (4, 16), generator=torch.Generator().manual_seed(1))


def full_state(model: torch.nn.Module) -> dict:
    """The gathered (full) state dict on rank 0 (a collective: every rank calls it)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _bytes(t: torch.Tensor) -> int:
    t = getattr(t, "_local_tensor", t)  # this rank's shard of a DTensor
    return t.storage_bytes() if isinstance(t, QftWeight) else t.numel() * t.element_size()


def rank_memory(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """What this rank stores: integer codes (vs their full count) and model-state bytes per model parameter."""
    local = full = 0
    for p in model.parameters():
        shard = getattr(p, "_local_tensor", p)
        if isinstance(shard, QftWeight):
            local += shard.codes.numel()
            full += p.numel()
    params = list(model.parameters())
    weights = sum(_bytes(p) for p in params)
    grads = sum(_bytes(p.grad) for p in params if p.grad is not None)
    states = sum(_bytes(t) for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    total = sum(p.numel() for p in params)
    return {
        "local_codes": local,
        "full_codes": full,
        "bytes_per_param": {"weights": weights / total, "grads": grads / total, "optimizer": states / total},
    }


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
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if args.method == "qft":
        optimizer = IntLion.from_model(model, lr=QFT_LR)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-3)
    ids = GLOBAL_BATCH[2 * rank : 2 * rank + 2]
    losses = []
    for step in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if step == 0:
            grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
            if rank == 0:
                torch.save(grads, Path(args.out, "grads.pt"))
        optimizer.step()
        memory = rank_memory(model, optimizer)  # gradients still held, as between Trainer steps without fusing
        optimizer.zero_grad()
        losses.append(loss.item())
        if step == 0:
            state = full_state(model)
            if rank == 0:
                torch.save(state, Path(args.out, "step1.pt"))
    model.eval()
    probe = torch.arange(16).view(1, 16)
    with torch.no_grad():
        logits = model(input_ids=probe).logits  # a collective under FSDP2: every rank runs it
    full = full_state(model)
    if rank == 0:
        model.save_pretrained(Path(args.out, "adapter"), state_dict=full)
        torch.save(logits, Path(args.out, "logits.pt"))
    result = {"rank": rank, "losses": losses, **memory}
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
