"""No silent garbage from what peqa_peft adopts or writes (issue 21).

Adopted quantized checkpoints get the checks saved adapters get (one module, ``peqa_peft.integrations.validation``),
before any layer is replaced; merged saves and exports replace their target directory atomically and leave nothing
stale; output paths are checked before any model is loaded.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_llama
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import peqa_peft  # noqa: F401
from peqa_peft import PeqaConfig
from peqa_peft.integrations import validation

FIXTURE = REPO / "tests" / "fixtures" / "compressed_tensors" / "aidreams260K-llama-hf-w4-asym-channel-rtn"
K_PROJ = "model.layers.0.self_attn.k_proj"
PY = sys.executable


@pytest.fixture
def ckpt(tmp_path):
    """A copy of the asymmetric 4-bit per-channel llm-compressor checkpoint, to edit."""
    out = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, out)
    return out


def edit_checkpoint(path: Path, edit) -> None:
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_adoption_refused(path: Path, message: str) -> None:
    """get_peft_model raises ``message`` (a ValueError) and leaves the loaded model exactly as it was."""
    model = AutoModelForCausalLM.from_pretrained(path)
    modules = {n: type(m) for n, m in model.named_modules()}
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        get_peft_model(model, PeqaConfig(bits=4, task_type="CAUSAL_LM"))
    assert {n: type(m) for n, m in model.named_modules()} == modules, "modules were replaced"
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:  # bitwise, NaN included (the NaN probe's scale must still be there, untouched)
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, equal_nan=True)


def _set(name, fn):
    def edit(t):
        t[name] = fn(t[name])

    return edit


def _nan_row(scale):
    scale = scale.clone()
    scale[5] = float("nan")
    return scale


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            _set(f"{K_PROJ}.weight_scale", _nan_row),
            r"layer 'model\.layers\.0\.self_attn\.k_proj'.*'weight_scale' contains 1 NaN or inf values \(first at row 5",
        ),
        (_set(f"{K_PROJ}.weight_scale", torch.zeros_like), r"k_proj'.*'weight_scale' must be positive, but 64 of 64"),
        (_set(f"{K_PROJ}.weight_scale", torch.neg), r"k_proj'.*'weight_scale' must be positive"),
        # gate_proj has 172 outputs: 172 * 4 bits leave 16 padding bits in the last zero-point word, which -1 sets
        (
            lambda t: [
                t.__setitem__(k, torch.full_like(v, -1)) for k, v in list(t.items()) if k.endswith("zero_point")
            ],
            r"mlp\.gate_proj'.*'weight_zero_point' has non-zero padding bits",
        ),
    ],
    ids=["nan-scale-row", "zero-scales", "negated-scales", "zero-point-words-minus-1"],
)
def test_corrupt_adopted_tensors_are_refused_naming_file_and_layer(ckpt, edit, message):
    edit_checkpoint(ckpt, edit)
    assert_adoption_refused(ckpt, f"model.safetensors: .*{message}")


def test_symmetric_config_with_stored_zero_points_is_refused(ckpt):
    """transformers drops the zero-points as UNEXPECTED; adoption names the layer and the contradiction."""
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = True
    (ckpt / "config.json").write_text(json.dumps(config))
    assert_adoption_refused(
        ckpt, r"layer 'model\.layers\.0\.self_attn\.q_proj'.*says 'symmetric: true'.*stores 'weight_zero_point'"
    )


def test_asymmetric_config_without_zero_points_is_refused(ckpt):
    edit_checkpoint(ckpt, lambda t: [t.pop(k) for k in list(t) if k.endswith("weight_zero_point")])
    assert_adoption_refused(ckpt, r"q_proj'.*says 'symmetric: false'.*needs 'weight_zero_point'.*no such tensor")


def test_unedited_checkpoint_still_adopts(ckpt):
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    get_peft_model(model, PeqaConfig(bits=4, task_type="CAUSAL_LM"))


@pytest.mark.parametrize("bad", [float("nan"), 0.0, -0.02])
def test_gptq_scales_are_checked_like_adapters(bad):
    from test_adopt_checkpoints import FakeGptqLinear
    from torch import nn

    scales = torch.full((2, 32), 0.02)
    scales[1, 3] = bad
    codes = torch.randint(0, 16, (32, 64), generator=torch.Generator().manual_seed(0))
    model = nn.Sequential(FakeGptqLinear(codes, scales, torch.full((2, 32), 8), 4, torch.arange(64) // 32))
    with pytest.raises(ValueError, match=r"layer '0': 'scales' (contains 1 NaN|must be positive, but 1 of 64)"):
        get_peft_model(model, PeqaConfig(bits=4, group_size=32, target_modules=["0"]))
    assert isinstance(model[0], FakeGptqLinear)


def test_shared_checks():
    """The functions the GGUF reader calls: sign checking is a parameter (K-quant sub-block minima are negative)."""
    scale = torch.tensor([[0.5], [-0.25], [0.0]])
    validation.check_scales(scale, "f.gguf: tensor 'blk.0'", sign="any")
    with pytest.raises(ValueError, match=r"^f\.gguf: tensor 'blk\.0': 'scale' must be positive, but 2 of 3"):
        validation.check_scales(scale, "f.gguf: tensor 'blk.0'")
    with pytest.raises(ValueError, match="NaN"):
        validation.check_scales(torch.tensor([float("inf")]), "w", sign="any")
    validation.check_grid(torch.tensor([-8, 7]), 4, "w", "zp", signed=True)
    with pytest.raises(ValueError, match=r"'zp' has 1 values outside \[0, 15\]"):
        validation.check_grid(torch.tensor([0, 16]), 4, "w", "zp")
    with pytest.raises(ValueError, match="fractional"):
        validation.check_grid(torch.tensor([0.5]), 4, "w", "zp")
    validation.check_padding_bits(torch.tensor([[0x0FFF_FFFF]], dtype=torch.int32), 28, "w", "p")
    with pytest.raises(ValueError, match="padding"):
        validation.check_padding_bits(torch.tensor([[-1]], dtype=torch.int32), 28, "w", "p")
