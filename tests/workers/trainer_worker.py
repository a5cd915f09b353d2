"""Worker of tests/test_distributed.py: PEQA or QFT fine-tuning with transformers' Trainer in one or more processes.

    python tests/workers/trainer_worker.py --method qft --per-device-batch 4 --out DIR             # one process
    torchrun --nproc_per_node 2 tests/workers/trainer_worker.py --method qft --per-device-batch 2 --out DIR   # DDP

Every rank writes ``rank<R>.json``: the logged (global) training losses and a SHA-256 of every tuned tensor after
training, so the test can check that ranks are bit-identical and that the losses match one process at the same
global batch. Batches are taken in order (no shuffling), so rank r of a 2-process run sees exactly one half of the
single-process batch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402
from torch.utils.data import SequentialSampler  # noqa: E402
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments  # noqa: E402

import peqa_peft  # noqa: E402,F401  (registers PEQA and QFT)
from peqa_peft import IntLion, PeqaConfig, QftConfig  # noqa: E402
from peqa_peft.tuners.qft import QftWeight  # noqa: E402


class InOrderTrainer(Trainer):
    """Trainer without shuffling: with accelerate's batch sharding, rank r gets every world-th batch in order."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def digest(model: torch.nn.Module) -> str:
    """SHA-256 over every trainable tensor's stored bytes (a QFT weight's codes, scales, zero-points, outliers)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        tensors = p.state_tensors().values() if isinstance(p, QftWeight) else [p.detach()]
        for t in tensors:
            h.update(name.encode())
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--method", choices=["qft", "peqa"], default="qft")
    parser.add_argument("--per-device-batch", type=int, required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--ddp-gradient-sync", choices=["fp32", "int8"], default="fp32")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (64, 24), generator=torch.Generator().manual_seed(1))
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    if args.method == "qft":
        model = get_peft_model(
            model, QftConfig(task_type="CAUSAL_LM", outlier_refresh_steps=2, ddp_gradient_sync=args.ddp_gradient_sync)
        )
        optim = {"optimizer_cls_and_kwargs": IntLion.trainer_factory(lr=1e-3)}
    else:
        model = get_peft_model(model, PeqaConfig(task_type="CAUSAL_LM", bits=4))
        optim = {}
    targs = TrainingArguments(
        output_dir=args.out,
        per_device_train_batch_size=args.per_device_batch,
        max_steps=args.steps,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = InOrderTrainer(model=model, args=targs, train_dataset=dataset, **optim)
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    result = {
        "rank": rank,
        "world": int(os.environ.get("WORLD_SIZE", "1")),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "digest": digest(model),
        "ddp_ignored": len(getattr(model, "_ddp_params_and_buffers_to_ignore", [])) if args.method == "qft" else 0,
    }
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
    if os.environ.get("PEQA_DIST_DUMP"):
        state = {
            n: (p.state_tensors() if isinstance(p, QftWeight) else p.detach()) for n, p in model.named_parameters()
        }
        torch.save(state, Path(args.out, f"state{rank}.pt"))


if __name__ == "__main__":
    main()
