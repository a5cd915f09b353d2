"""QFT + IntLion inside TRL's SFTTrainer on the bundled demo Llama and real Alpaca rows."""

import json

import pytest
from conftest import DATA, DEMO_LLAMA

import peqa_peft  # noqa: F401  (registers QFT)
from peqa_peft import IntLion, QftConfig

LR = 5e-4


def _dataset(n_rows: int = 16):
    from datasets import Dataset

    rows = json.loads((DATA / "alpaca_en_demo.json").read_text())[:n_rows]
    texts = [
        f"### Instruction:\n{r['instruction']}\n"
        + (f"### Input:\n{r['input']}\n" if r["input"] else "")
        + f"### Response:\n{r['output']}"
        for r in rows
    ]
    return Dataset.from_dict({"text": texts})


def _trainer(out_dir, max_steps: int, grad_accum: int = 1, max_grad_norm: float = 1.0, save_steps: int = 0):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(DEMO_LLAMA)
    # TRL's fused LM head reads lm_head.weight directly and refuses a PEFT layer there: the head trains in float.
    config = QftConfig(task_type="CAUSAL_LM", outlier_refresh_steps=2, exclude_modules=["lm_head"])
    model = get_peft_model(model, config)
    args = SFTConfig(
        output_dir=str(out_dir),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=grad_accum,
        max_length=48,
        per_device_eval_batch_size=8,
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        max_grad_norm=max_grad_norm,
        lr_scheduler_type="constant",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=_dataset(),
        eval_dataset=_dataset(),
        processing_class=AutoTokenizer.from_pretrained(DEMO_LLAMA),
        optimizer_cls_and_kwargs=IntLion.trainer_factory(lr=LR, betas=(0.9, 0.99), weight_decay=0.01),
    )


def _losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def _grad_norms(trainer) -> dict[int, float]:
    return {h["step"]: h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h}


@pytest.mark.slow
def test_sft_trainer_lowers_loss_and_resumes_identically(tmp_path):
    trainer = _trainer(tmp_path / "run", max_steps=6, grad_accum=2, save_steps=3)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, IntLion)  # accelerate wraps the optimizer
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 0.05, (before, after)
    losses, norms = _losses(trainer), _grad_norms(trainer)
    # Trainer's grad_norm is clip_grad_norm_'s total norm of the int8 gradients: real, finite, positive.
    assert len(norms) == 6 and all(0 < n < float("inf") for n in norms.values()), norms

    resumed = _trainer(tmp_path / "run", max_steps=6, grad_accum=2, save_steps=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    again, again_norms = _losses(resumed), _grad_norms(resumed)
    assert [again[s] for s in (4, 5, 6)] == [losses[s] for s in (4, 5, 6)]
    assert [again_norms[s] for s in (4, 5, 6)] == [norms[s] for s in (4, 5, 6)]
