"""End-to-end train/eval workflows on the bundled model and real data slices (a few steps each)."""

import json
import math
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import DATA, DEMO_LLAMA, REPO
from peft import PeftModel
from transformers import AutoModelForCausalLM

from peqa_peft.workflows.cli import main
from peqa_peft.workflows.train import TrainConfig, check_has_linear_layers, train

TINY_TRAIN = dict(
    max_steps=2,
    batch_size=2,
    seq_len=160,
    max_samples=16,
    logging_steps=1,
    progress=False,
    dataset=str(DATA / "alpaca_en_demo.json"),
)


def run_eval_cli(*args) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "peqa_peft", "eval", "--model", str(DEMO_LLAMA), "--json", "--no-progress", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["peqa", "qft", "lora"])
def test_train_then_eval_end_to_end(tmp_path, method):
    cfg = TrainConfig(
        model=str(DEMO_LLAMA),
        method=method,
        output_dir=str(tmp_path / "out"),
        bits=3,
        eval_datasets=["wikitext2"],
        eval_max_tokens=2048,
        **TINY_TRAIN,
    )
    summary = train(cfg)
    out = tmp_path / "out"
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md", "train_summary.json"):
        assert (out / name).exists(), name
    assert summary["steps"] == 2 and math.isfinite(summary["train_loss"])
    assert (
        summary["trainable_params"] > 0
        and summary["adapter_bytes"] == (out / "adapter_model.safetensors").stat().st_size
    )
    ppl_train = summary["eval"]["wikitext2"]["perplexity"]
    assert math.isfinite(ppl_train)
    card = (out / "README.md").read_text()
    assert "Training and evaluation (peqa_peft)" in card and "wikitext2 perplexity" in card and "steps: 2" in card
    if method == "peqa":
        assert "bits: 3" in card and json.loads((out / "adapter_config.json").read_text())["peft_type"] == "PEQA"

    # reload the adapter in a fresh process through the CLI: same perplexity as measured right after training
    result = run_eval_cli("--adapter", str(out), "--dataset", "wikitext2", "--max-tokens", "2048", "--seq-len", "160")
    assert result["tokens"] == summary["eval"]["wikitext2"]["tokens"]
    assert math.isclose(result["perplexity"], ppl_train, rel_tol=1e-5)
    again = run_eval_cli("--adapter", str(out), "--dataset", "wikitext2", "--max-tokens", "2048", "--seq-len", "160")
    assert again["perplexity"] == result["perplexity"]


@pytest.mark.slow
def test_train_qlora_where_bitsandbytes_runs(tmp_path):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs the [bnb] extra")
    out = tmp_path / "q"
    summary = train(TrainConfig(model=str(DEMO_LLAMA), method="qlora", output_dir=str(out), **TINY_TRAIN))
    assert summary["steps"] == 2 and math.isfinite(summary["train_loss"])
    assert (out / "adapter_model.safetensors").exists()
    # evaluated on its NF4 base, in a fresh process
    result = run_eval_cli("--adapter", str(out), "--load-in-4bit", "--dataset", "wikitext2", "--max-tokens", "1024")
    assert math.isfinite(result["perplexity"]) and result["tokens"] > 0


@pytest.mark.slow
def test_train_is_reproducible_with_a_seed(tmp_path):
    from safetensors.torch import load_file

    outs = []
    for run in ("a", "b"):
        train(TrainConfig(model=str(DEMO_LLAMA), output_dir=str(tmp_path / run), **TINY_TRAIN))
        outs.append(load_file(tmp_path / run / "adapter_model.safetensors"))
    assert outs[0].keys() == outs[1].keys()
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


@pytest.mark.slow
def test_checkpoint_and_resume(tmp_path):
    """Resuming from a mid-run checkpoint ends with the same adapter as the uninterrupted run."""
    import shutil

    from safetensors.torch import load_file

    cfg = dict(model=str(DEMO_LLAMA), save_steps=2, **{**TINY_TRAIN, "max_steps": 4})
    full = train(TrainConfig(output_dir=str(tmp_path / "full"), **cfg))
    assert (tmp_path / "full" / "checkpoint-2").exists()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = train(TrainConfig(output_dir=str(tmp_path / "resumed"), resume_from_checkpoint="last", **cfg))
    assert resumed["steps"] == full["steps"] == 4
    a = load_file(tmp_path / "full" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eval_cli_base_and_quantized_base(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text((DATA / "wikitext2_test.raw.txt").read_text()[:20000])
    fp = run_eval_cli("--text-file", str(text), "--max-tokens", "1024", "--seq-len", "128")
    rtn = run_eval_cli("--text-file", str(text), "--max-tokens", "1024", "--seq-len", "128", "--bits", "3")
    assert fp["tokens"] == rtn["tokens"] == 8 * 127
    assert math.isfinite(fp["perplexity"]) and math.isfinite(rtn["perplexity"])
    assert rtn["perplexity"] != fp["perplexity"]


def test_push_to_hub_from_train_uses_stand_in(tmp_path):
    cfg = TrainConfig(
        model=str(DEMO_LLAMA),
        output_dir=str(tmp_path / "out"),
        push_to_hub="me/peqa-demo",
        **{**TINY_TRAIN, "max_steps": 1},
    )
    fake_api = mock.MagicMock()
    fake_api.create_repo.return_value.repo_id = "me/peqa-demo"
    uploaded = {}

    def upload_folder(repo_id, folder_path, allow_patterns, **kwargs):
        uploaded.update(
            {
                p.name: p.read_bytes()
                for p in Path(folder_path).iterdir()
                if any(p.match(pattern) for pattern in allow_patterns)
            }
        )
        return "https://hub.example/commit/1"

    fake_api.upload_folder.side_effect = upload_folder
    with mock.patch("peqa_peft.integrations.hub.HfApi", return_value=fake_api):
        summary = train(cfg)
    assert summary["hub_commit"] == "https://hub.example/commit/1"
    assert sorted(uploaded) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "train_summary.json"]
    card = uploaded["README.md"].decode()
    assert "method: peqa" in card and "dataset:" in card and "method: PEQA" in card


def test_bad_input_fails_before_training(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "q", "answer": "a"}]))
    with pytest.raises(ValueError, match="expected Alpaca columns"):
        train(TrainConfig(model=str(DEMO_LLAMA), dataset=str(bad), output_dir=str(tmp_path / "o")))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TrainConfig(model=str(DEMO_LLAMA), dataset=str(tmp_path / "missing.json"), output_dir=str(tmp_path / "o"))
        train(TrainConfig(model=str(DEMO_LLAMA), dataset=str(tmp_path / "missing.json"), output_dir=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="model directory"):
        TrainConfig(model=str(tmp_path / "no-model"), output_dir=str(tmp_path / "o"))
    with pytest.raises(ValueError, match="exceeds the model's context length"):
        train(TrainConfig(model=str(DEMO_LLAMA), seq_len=4096, output_dir=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="raise --seq-len"):
        train(TrainConfig(model=str(DEMO_LLAMA), output_dir=str(tmp_path / "short"), **{**TINY_TRAIN, "seq_len": 16}))
    with pytest.raises(ValueError, match="unknown method"):
        TrainConfig(model=str(DEMO_LLAMA), method="dora")
    with pytest.raises(ValueError, match="no nn.Linear"):
        check_has_linear_layers(torch.nn.Sequential(torch.nn.Embedding(4, 4), torch.nn.LayerNorm(4)))
    assert not (tmp_path / "o").exists()
    # the CLI turns these into one clear line and exit status 2
    assert main(["train", "--model", str(DEMO_LLAMA), "--output-dir", str(tmp_path / "o"), "--seq-len", "4096"]) == 2
    assert "exceeds the model's context length" in capsys.readouterr().err


def test_adapter_for_another_base_is_refused(tmp_path):
    from peft import get_peft_model

    import peqa_peft

    other = REPO / "assets" / "models" / "aidreams260K-llama-hf"  # a second, different pretrained Llama
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(other), peqa_peft.PeqaConfig(bits=4))
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="different quantized base|does not fit"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DEMO_LLAMA), tmp_path / "adapter")
    assert (
        main(
            [
                "eval",
                "--model",
                str(DEMO_LLAMA),
                "--adapter",
                str(tmp_path / "adapter"),
                "--dataset",
                "wikitext2",
                "--max-tokens",
                "512",
            ]
        )
        == 2
    )


def test_peqa_learning_rate_is_judged_against_the_models_scales(capsys):
    """The CLI relates the learning rate to the median base scale (AdamW moves each scale by about the learning rate
    per step): the default becomes PEQA_SUGGESTED_RELATIVE_LR of the median scale where that is smaller, a rate the
    user set is kept, with a warning above PEQA_MAX_RELATIVE_LR suggesting that value."""
    import warnings

    from peft import get_peft_model

    from peqa_peft import PeqaConfig, QftConfig, QuantLinear
    from peqa_peft.workflows import train as train_module

    def demo_linears():  # the float demo model's linear layers but the head (what QFT's rule samples)
        demo = AutoModelForCausalLM.from_pretrained(DEMO_LLAMA)
        return [m for n, m in demo.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(DEMO_LLAMA), PeqaConfig(init_method="minmax", task_type="CAUSAL_LM")
    )

    def config(**kwargs):
        return train_module.TrainConfig(model=str(DEMO_LLAMA), method="peqa", output_dir="unused", **kwargs)

    median = torch.cat([m.scale.abs().flatten() for m in model.modules() if isinstance(m, QuantLinear)]).median()
    fitted = train_module.PEQA_SUGGESTED_RELATIVE_LR * median.item()
    assert fitted < train_module.DEFAULT_LR["peqa"]  # the demo's scales: 2e-4 would be ~2% of them
    default = config()
    assert default.learning_rate == train_module.DEFAULT_LR["peqa"] and default.learning_rate_is_default
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_module.fit_learning_rate(model, default)
    assert default.learning_rate == pytest.approx(fitted, rel=0.05)  # rounded to 2 digits
    assert "instead of the default 0.0002" in capsys.readouterr().err
    explicit = config(learning_rate=2e-4)
    with pytest.warns(UserWarning, match=r"learning rate 0.0002 is \d+\.\d+% .*Consider a learning rate of \d.*--lr"):
        train_module.fit_learning_rate(model, explicit)
    assert explicit.learning_rate == 2e-4 and "of the median base scale" in capsys.readouterr().err
    # scales 10x larger (as SmolLM2's against the demo's): the default 2e-4 is kept, without a warning
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, QuantLinear):
                layer.scale.mul_(10)
    kept = config()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_module.fit_learning_rate(model, kept)
    assert kept.learning_rate == train_module.DEFAULT_LR["peqa"]
    # QFT: IntLion moves each weight by about the learning rate, so its default follows the median |weight|
    qft = get_peft_model(AutoModelForCausalLM.from_pretrained(DEMO_LLAMA), QftConfig(task_type="CAUSAL_LM"))
    qft_default = train_module.TrainConfig(model=str(DEMO_LLAMA), method="qft", output_dir="unused")
    train_module.fit_learning_rate(qft, qft_default)
    dense = torch.cat([m.weight.abs().flatten() for m in demo_linears()]).median().item()
    assert qft_default.learning_rate == pytest.approx(train_module.QFT_SUGGESTED_RELATIVE_LR * dense, rel=0.1)
    assert qft_default.learning_rate < train_module.DEFAULT_LR["qft"] and "median |weight|" in capsys.readouterr().err
