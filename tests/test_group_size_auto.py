"""PEQA's default group size, "auto": group 32 where 32 divides every targeted layer's width, else per channel;
and its default init, "auto": the MSE search with groups, round-to-nearest per channel.

The rule was chosen on real models (benchmarks/real_models.py); here: it resolves to one concrete value that the
config (and so the saved adapter / quantization_config) records, explicit values are untouched, already quantized
layers keep their grid, and an adapter saved with the default reloads identically in a fresh process.
"""

import argparse
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO, tiny_llama
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from peqa_peft import PeqaConfig, PeqaQuantizationConfig, QuantLinear
from peqa_peft.core import AUTO_GROUP_SIZE, resolve_auto_group_size, resolve_auto_init_method
from peqa_peft.tuners.peqa.layer import PeqaLayer
from peqa_peft.workflows.cli import add_eval_parser, add_train_parser

SMALL = REPO / "assets" / "models" / "aidreams260K-llama-hf"  # widths 64 and 172 (down_proj)
IDS = torch.tensor([[1, 45, 99, 3, 12, 7, 50, 31]])


def bases(model):
    return [m.get_base_layer() for m in model.modules() if isinstance(m, PeqaLayer)]


def test_rule():
    assert AUTO_GROUP_SIZE == 32
    assert resolve_auto_group_size([576, 1536]) == 32  # SmolLM2-135M
    assert resolve_auto_group_size([640, 1024, 2048]) == 32  # Gemma 3 270M
    assert resolve_auto_group_size([256, 688]) is None  # the demo model: per channel for the whole model
    assert resolve_auto_group_size([]) is None


def test_default_is_auto_and_resolves_to_one_recorded_value():
    assert PeqaConfig().group_size == "auto" and PeqaQuantizationConfig().group_size == "auto"
    config = PeqaConfig(task_type="CAUSAL_LM")
    model = get_peft_model(tiny_llama(), config)  # widths 64 and 128
    assert config.group_size == 32 and model.peft_config["default"].group_size == 32
    assert {b.group_size for b in bases(model)} == {32}
    assert model.peft_config["default"].base_fingerprint["group_size"] == 32
    # a width 32 does not divide: the whole model is per channel, not a mixture
    config = PeqaConfig(task_type="CAUSAL_LM")
    model = get_peft_model(tiny_llama(intermediate_size=48), config)
    assert config.group_size is None and {b.group_size for b in bases(model)} == {None}


def test_default_init_follows_the_resolved_grid_and_is_recorded(tmp_path):
    assert resolve_auto_init_method(32) == "mse" and resolve_auto_init_method(None) == "minmax"
    assert PeqaConfig().init_method == "auto" and PeqaQuantizationConfig().init_method == "auto"
    grouped, per_channel = PeqaConfig(task_type="CAUSAL_LM"), PeqaConfig(task_type="CAUSAL_LM", group_size=None)
    get_peft_model(tiny_llama(), grouped)
    model = get_peft_model(tiny_llama(), per_channel)
    assert (grouped.init_method, per_channel.init_method) == ("mse", "minmax")
    # round-to-nearest per channel: the base equals the "minmax" quantization of the weight
    base = bases(model)[0]
    explicit = QuantLinear.from_linear(tiny_llama().model.layers[0].self_attn.q_proj, 4, None, method="minmax")
    torch.testing.assert_close(base.scale, explicit.scale, rtol=0, atol=0)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_method"] == "minmax"
    explicit_config = PeqaConfig(task_type="CAUSAL_LM", group_size=None, init_method="mse")
    get_peft_model(tiny_llama(), explicit_config)
    assert explicit_config.init_method == "mse"
    loaded = AutoModelForCausalLM.from_pretrained(SMALL, quantization_config=PeqaQuantizationConfig())
    assert loaded.config.quantization_config.init_method == "minmax"  # per channel (172-wide down_proj)


def test_explicit_values_are_kept():
    model = get_peft_model(tiny_llama(), PeqaConfig(group_size=None))
    assert {b.group_size for b in bases(model)} == {None}
    with pytest.raises(ValueError, match="does not divide in_features=48"):
        get_peft_model(tiny_llama(intermediate_size=48), PeqaConfig(group_size=32))


def test_auto_adopts_an_already_quantized_grid_and_a_second_adapter_shares_it():
    qconfig = PeqaQuantizationConfig(group_size=4)  # divides 64 and 172
    model = AutoModelForCausalLM.from_pretrained(SMALL, quantization_config=qconfig)
    peft_model = get_peft_model(model, PeqaConfig(task_type="CAUSAL_LM"))
    assert peft_model.peft_config["default"].group_size == 4
    second = PeqaConfig(task_type="CAUSAL_LM")
    peft_model.add_adapter("second", second)
    assert second.group_size == 4


def test_quantize_on_load_resolves_auto_into_the_saved_config(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(SMALL, quantization_config=PeqaQuantizationConfig())
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert {m.group_size for m in layers} == {None}  # 172-wide down_proj: per channel
    model = AutoModelForCausalLM.from_pretrained(
        SMALL, quantization_config=PeqaQuantizationConfig(exclude_modules=["down_proj"])
    )
    assert {m.group_size for m in model.modules() if isinstance(m, QuantLinear)} == {32}
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["group_size"] == 32


def test_default_adapter_reloads_identically_in_a_fresh_process(tmp_path):
    base = tiny_llama(seed=3)
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, PeqaConfig(task_type="CAUSAL_LM", init_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["group_size"] == 32
    with torch.no_grad():
        torch.save(model(IDS).logits, tmp_path / "logits.pt")
    script = textwrap.dedent(
        f"""
        import torch, peqa_peft
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(tmp_path / "base")!r}),
                                          {str(tmp_path / "adapter")!r})
        with torch.no_grad():
            assert torch.equal(model(torch.tensor({IDS.tolist()})).logits, torch.load({str(tmp_path / "logits.pt")!r}))
        print("ok", model.peft_config["default"].group_size)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-2:] == ["ok", "32"]


def test_cli_group_size_values():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_train_parser(sub)
    add_eval_parser(sub)
    train = ["train", "--model", "m", "--output-dir", "o"]
    assert parser.parse_args(train).group_size is None  # not given: TrainConfig's default ("auto")
    assert parser.parse_args([*train, "--group-size", "none"]).group_size == "channel"
    assert parser.parse_args([*train, "--group-size", "auto"]).group_size == "auto"
    assert parser.parse_args([*train, "--group-size", "64"]).group_size == 64
    assert parser.parse_args(["eval", "--model", "m", "--bits", "4"]).group_size == "auto"
