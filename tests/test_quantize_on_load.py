"""Quantize while loading: from_pretrained(..., quantization_config=PeqaQuantizationConfig(...))."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO
from peft import get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import peqa_peft
from peqa_peft import PeqaConfig, PeqaQuantizationConfig, QuantLinear

SMALL = REPO / "assets" / "models" / "aidreams260K-llama-hf"
IDS = torch.tensor([[1, 45, 99, 300, 12, 7, 250, 31]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def quantized_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("bits,group_size,method", [(4, None, "minmax"), (3, 32, "mse")])
def test_loads_packed_layers_equal_to_quantizing_after_loading(bits, group_size, method):
    qconfig = PeqaQuantizationConfig(
        bits=bits, group_size=group_size, init_method=method, exclude_modules=["down_proj"]
    )
    model = AutoModelForCausalLM.from_pretrained(SMALL, quantization_config=qconfig)
    layers = quantized_layers(model)
    assert len(layers) == 4 * 6  # q, k, v, o, gate, up of 4 blocks; down_proj and lm_head stay float
    assert all("weight" not in dict(m.named_parameters()) for m in layers.values())
    assert isinstance(model.lm_head, torch.nn.Linear) and isinstance(
        model.model.layers[0].mlp.down_proj, torch.nn.Linear
    )
    reference = get_peft_model(
        AutoModelForCausalLM.from_pretrained(SMALL),
        PeqaConfig(bits=bits, group_size=group_size, init_method=method, exclude_modules=["down_proj"]),
    )
    torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=0)
    # get_peft_model adopts the loaded layers as they are
    first = layers["model.layers.0.self_attn.q_proj"]
    peft_model = get_peft_model(
        model, PeqaConfig(bits=bits, group_size=group_size, exclude_modules=["down_proj"], task_type="CAUSAL_LM")
    )
    assert peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer is first
    torch.testing.assert_close(logits(peft_model), logits(reference), rtol=0, atol=0)


def test_adapter_with_other_bits_or_group_size_is_refused():
    model = AutoModelForCausalLM.from_pretrained(SMALL, quantization_config=PeqaQuantizationConfig(bits=4))
    with pytest.raises(ValueError, match=r"already quantized \(QuantLinear: bits=4, group_size=None\).*bits=3"):
        get_peft_model(model, PeqaConfig(bits=3))
    with pytest.raises(ValueError, match=r"group_size=None.*group_size=16"):
        get_peft_model(model, PeqaConfig(bits=4, group_size=16))


def test_bad_configs_fail_clearly():
    with pytest.raises(ValueError, match="`bits` must be one of"):
        PeqaQuantizationConfig(bits=9)
    with pytest.raises(ValueError, match=r"group_size=32.*in_features=172.*mlp\.down_proj"):
        AutoModelForCausalLM.from_pretrained(SMALL, quantization_config=PeqaQuantizationConfig(group_size=32))
    with pytest.raises(ValueError, match="selects no linear layer"):
        AutoModelForCausalLM.from_pretrained(SMALL, quantization_config=PeqaQuantizationConfig(target_modules=["x"]))


@pytest.mark.slow
def test_save_and_reload_quantized_base_and_merged_model_in_fresh_process(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(SMALL, quantization_config=PeqaQuantizationConfig(bits=3))
    model.save_pretrained(tmp_path / "base")
    base_logits = logits(model)
    peft_model = get_peft_model(model, PeqaConfig(bits=3, init_weights=False, task_type="CAUSAL_LM"))
    tuned_logits = logits(peft_model)
    assert not torch.allclose(tuned_logits, base_logits)
    peft_model.merge_and_unload().save_pretrained(tmp_path / "merged")
    torch.save({"ids": IDS, "base": base_logits, "merged": tuned_logits}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import torch, peqa_peft
        from transformers import AutoModelForCausalLM
        from peqa_peft import QuantLinear
        ref = torch.load({str(tmp_path / "expected.pt")!r})
        base = AutoModelForCausalLM.from_pretrained({str(tmp_path / "base")!r})
        assert isinstance(base.model.layers[0].mlp.down_proj, QuantLinear)
        assert base.config.quantization_config.bits == 3
        with torch.no_grad():
            out = base(ref["ids"]).logits
        assert torch.equal(out, ref["base"]), (out - ref["base"]).abs().max()
        # a merged model is a standard checkpoint: compressed-tensors, read by transformers' own loader
        import json, pathlib
        config = json.loads(pathlib.Path({str(tmp_path / "merged" / "config.json")!r}).read_text())
        assert config["quantization_config"]["quant_method"] == "compressed-tensors"
        merged = AutoModelForCausalLM.from_pretrained({str(tmp_path / "merged")!r})  # decompressed (canonical layout)
        with torch.no_grad():
            out = merged(ref["ids"]).logits
        torch.testing.assert_close(out, ref["merged"], rtol=1e-5, atol=5e-5)
        print("IDENTICAL")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert "IDENTICAL" in result.stdout, result.stderr[-3000:]


def test_gpt2_conv1d_with_biases(tmp_path):
    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=500, n_positions=32)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2", quantization_config=PeqaQuantizationConfig(bits=4))
    layers = quantized_layers(model)
    assert set(n.rsplit(".", 1)[-1] for n in layers) == {"c_attn", "c_proj", "c_fc"}
    assert all(m.bias is not None and m.bias.device.type == "cpu" for m in layers.values())
    reference = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2"), PeqaConfig(bits=4))
    torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=0)
    model.save_pretrained(tmp_path / "gpt2-peqa")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2-peqa")
    assert len(quantized_layers(reloaded)) == len(layers)
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=0)
    assert peqa_peft.PeqaQuantizationConfig is PeqaQuantizationConfig


@pytest.mark.slow
def test_start_from_low_bits_example(tmp_path):
    cmd = [sys.executable, str(REPO / "examples" / "start_from_low_bits.py"), "--steps", "1"]
    result = subprocess.run(
        [*cmd, "--output-dir", str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    for flow in ("quantize_on_load", "adopted"):
        assert summary[flow]["identical_reload"] is True and summary[flow]["merged_max_diff"] < 1e-4
