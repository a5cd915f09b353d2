"""QFT full-parameter SFT of the bundled demo Llama on Alpaca rows with TRL's SFTTrainer and IntLion.

    python examples/sft_alpaca_qft.py --steps 20 --output-dir /tmp/qft-sft
    python examples/sft_alpaca_qft.py --steps 20 --float-gradients   # compare: gradients in fp32

Prints one JSON line: held-out Alpaca response loss before/after, model-state bytes per parameter (weights /
gradients / optimizer, measured after a backward pass, i.e. with gradients resident) and their share of fp32
AdamW's 16 bytes/param.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

import peqa_peft  # noqa: E402,F401  (registers QFT with PEFT)
from peqa_peft import IntLion, QftConfig  # noqa: E402
from peqa_peft.core.layer_memory import model_state_bytes  # noqa: E402
from peqa_peft.workflows.data import load_instruction_dataset  # noqa: E402
from peqa_peft.workflows.train import QFT_BETAS, QFT_WARMUP  # noqa: E402  (the recommended QFT recipe)

DEMO_QFT_LR = 3e-4

REPO = Path(__file__).resolve().parents[1]


def alpaca_splits(path: str, train_rows: int, eval_rows: int):
    """Disjoint train / held-out Alpaca rows in prompt/completion form (the loss is on the responses only)."""
    data = load_instruction_dataset(path, max_samples=train_rows + eval_rows, seed=0)
    return data.select(range(train_rows)), data.select(range(train_rows, train_rows + eval_rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "assets" / "demo-llama"))
    parser.add_argument("--data", default=str(REPO / "assets" / "data" / "alpaca_en_demo.json"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--train-rows", type=int, default=256)
    parser.add_argument("--eval-rows", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    # the demo model's best rate in benchmarks/qft_quality.py's sweep; the CLI's DEFAULT_LR["qft"] (1e-4) is the
    # rate measured best on a real pretrained model
    parser.add_argument("--lr", type=float, default=DEMO_QFT_LR)
    parser.add_argument("--outlier-fraction", type=float, default=0.01)
    parser.add_argument("--float-gradients", action="store_true", help="hold weight gradients in fp32, not int8")
    parser.add_argument("--output-dir", default="/tmp/qft-sft")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    n_params = sum(p.numel() for p in model.parameters())
    config = QftConfig(
        task_type="CAUSAL_LM",
        # TRL's SFTTrainer computes the loss from lm_head.weight directly (fused LM head) and refuses a PEFT layer
        # there, so under SFTTrainer the output head is trained as a float parameter; everything else is integer.
        exclude_modules=["lm_head"],
        outlier_fraction=args.outlier_fraction,
        int8_gradients=not args.float_gradients,
    )
    model = get_peft_model(model, config)
    train_args = SFTConfig(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        max_length=args.seq_len,
        max_grad_norm=1.0,
        lr_scheduler_type="linear",
        warmup_steps=QFT_WARMUP,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
        disable_tqdm=True,
    )
    train_rows, eval_rows = alpaca_splits(args.data, args.train_rows, args.eval_rows)
    trainer = SFTTrainer(
        model=model,
        args=train_args,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        processing_class=AutoTokenizer.from_pretrained(args.model),
        optimizer_cls_and_kwargs=IntLion.trainer_factory(lr=args.lr, betas=QFT_BETAS, weight_decay=0.0),
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]

    batch = next(iter(trainer.get_train_dataloader()))
    model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}).loss.backward()
    states = model_state_bytes(model, trainer.optimizer)
    model.zero_grad()
    model.save_pretrained(args.output_dir)
    per_param = {k: round(v / n_params, 3) for k, v in states.items()}
    summary = {
        "eval_loss_before": round(before, 4),
        "eval_loss_after": round(after, 4),
        "int8_gradients": not args.float_gradients,
        "bytes_per_param": per_param,
        "share_of_fp32_adamw": round(sum(states.values()) / n_params / 16, 4),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
