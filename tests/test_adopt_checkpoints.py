"""Adopting quantized checkpoints as PEQA bases: compressed-tensors files written by llm-compressor, GPTQ layers.

The fixtures in ``tests/fixtures/compressed_tensors/`` are real llm-compressor 0.14 checkpoints of the bundled
aidreams260K model (``scripts/make_quantized_checkpoints.py``, run in llm-compressor's own virtualenv); next to each
lie the logits that llm-compressor's own stack (its transformers and compressed-tensors) computes for a fixed prompt.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import REPO
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

import peqa_peft
from peqa_peft import PeqaConfig, QuantLinear
from peqa_peft.tuners.peqa import PeqaLayer
from peqa_peft.tuners.peqa.backends import compressed_tensors as ct_backend
from peqa_peft.tuners.peqa.backends import gptq as gptq_backend

FIXTURES = REPO / "tests" / "fixtures" / "compressed_tensors"
CHECKPOINTS = sorted(p for p in FIXTURES.iterdir() if (p / "writer.json").exists()) if FIXTURES.exists() else []
ASYM4 = FIXTURES / "aidreams260K-llama-hf-w4-asym-channel-rtn"
SYM4_G32 = FIXTURES / "aidreams260K-llama-hf-w4-sym-g32-rtn"
OTHER_BASE = REPO / "assets" / "models" / "aidreams260K-llama-hf"

pytestmark = pytest.mark.skipif(not CHECKPOINTS, reason="compressed-tensors fixtures missing")


def writer(path: Path) -> tuple[dict, dict]:
    return json.loads((path / "writer.json").read_text()), load_file(path / "writer_logits.safetensors")


def peqa_config(meta: dict, **kwargs) -> PeqaConfig:
    # grouped recipes leave the layers the group does not divide (down_proj, 172 inputs) in float: not targeted here
    exclude = ["down_proj"] if meta["group_size"] else None
    return PeqaConfig(
        bits=meta["bits"], group_size=meta["group_size"], exclude_modules=exclude, task_type="CAUSAL_LM", **kwargs
    )


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("path", CHECKPOINTS, ids=[p.name.split("hf-")[-1] for p in CHECKPOINTS])
def test_adopted_checkpoint_reproduces_the_writers_logits(path):
    """Plain from_pretrained (compressed mode) -> get_peft_model: the writer's own logits, no float weight built."""
    meta, ref = writer(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    compressed = [m for m in model.modules() if hasattr(m, "weight_packed")]
    assert compressed and all(getattr(m, "weight", None) is None for m in compressed)
    peft_model = get_peft_model(model, peqa_config(meta))
    layers = [m for m in peft_model.modules() if isinstance(m, PeqaLayer)]
    assert layers
    for layer in layers:
        base = layer.get_base_layer()
        assert isinstance(base, QuantLinear) and base.bits == meta["bits"] and base.group_size == meta["group_size"]
        assert getattr(base, "weight", None) is None
        if meta["symmetric"]:
            assert (base.zero_point == 2 ** (meta["bits"] - 1)).all()
    torch.testing.assert_close(logits(peft_model, ref["input_ids"]), ref["logits"], rtol=1e-5, atol=1e-5)


def test_codes_scales_zero_points_match_compressed_tensors_decompression():
    """Every adopted layer dequantizes to what compressed-tensors' own decompressor makes of the same tensors."""
    from compressed_tensors.compressors import BaseCompressor

    for path in (ASYM4, SYM4_G32):
        meta, _ = writer(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        config = peqa_config(meta)
        for name, module in model.named_modules():
            if not hasattr(module, "weight_packed"):
                continue
            state = {k: v for k, v in module.state_dict().items()}
            scheme = module.quantization_scheme
            reference = BaseCompressor.get_value_from_registry(scheme.format.value).decompress(state, scheme)["weight"]
            adopted = ct_backend.to_quant_linear(module, config, name)
            torch.testing.assert_close(adopted.dequantize(), reference.float(), rtol=0, atol=1e-6)


def test_layers_decompressed_by_a_forward_pass_are_adopted_exactly():
    """A forward pass before get_peft_model decompresses the model; the integers are recovered from the grid."""
    meta, ref = writer(ASYM4)
    model = AutoModelForCausalLM.from_pretrained(ASYM4)
    torch.testing.assert_close(logits(model, ref["input_ids"]), ref["logits"], rtol=1e-5, atol=1e-5)
    assert not any(hasattr(m, "weight_packed") for m in model.modules())
    peft_model = get_peft_model(model, peqa_config(meta))
    torch.testing.assert_close(logits(peft_model, ref["input_ids"]), ref["logits"], rtol=1e-5, atol=1e-5)


def test_mismatching_bits_or_group_size_is_refused_before_anything_changes():
    meta, _ = writer(ASYM4)
    model = AutoModelForCausalLM.from_pretrained(ASYM4)
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"q_proj.*already quantized.*bits=4, group_size=None.*bits=3"):
        get_peft_model(model, PeqaConfig(bits=3, task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match=r"group_size=None.*group_size=32"):
        get_peft_model(model, PeqaConfig(bits=4, group_size=32, task_type="CAUSAL_LM"))
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_unsupported_schemes_are_refused_naming_layer_and_scheme():
    from compressed_tensors.quantization import QuantizationArgs

    meta, _ = writer(ASYM4)
    model = AutoModelForCausalLM.from_pretrained(ASYM4)
    target = model.model.layers[1].mlp.up_proj
    target.quantization_scheme = target.quantization_scheme.model_copy(
        update={
            "input_activations": QuantizationArgs(
                num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True
            )
        }
    )
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.up_proj.*int4 channel asymmetric with activation"):
        get_peft_model(model, peqa_config(meta))
    target.quantization_scheme = target.quantization_scheme.model_copy(
        update={"input_activations": None, "weights": QuantizationArgs(num_bits=8, type="float", strategy="channel")}
    )
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.up_proj.*'float8 channel.*integer weight schemes"):
        get_peft_model(model, peqa_config(meta))
    assert not any(isinstance(m, PeqaLayer) for m in model.modules())


@pytest.mark.slow
def test_default_loader_needs_the_zero_point_repair():
    """Without peqa_peft imported, transformers 5.2x + compressed-tensors 0.20 cannot load an asymmetric checkpoint.

    If this starts failing, the installed versions fixed the bug and ``install_compat_fixes`` can go.
    """
    script = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(ASYM4)!r})"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode != 0 and "weight_zero_point" in result.stdout + result.stderr


def test_zero_point_repair_is_idempotent():
    assert ct_backend.install_compat_fixes() and ct_backend.install_compat_fixes()
    model = AutoModelForCausalLM.from_pretrained(ASYM4)
    assert ct_backend._pack_meta_zero_points(model) == 0  # loaded tensors are never touched


def train_one_step(model, ids):
    optim = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(ids, labels=ids).loss.backward()
    optim.step()
    optim.zero_grad()


@pytest.mark.slow
def test_delta_s_saves_reloads_in_a_fresh_process_and_merges(tmp_path):
    meta, ref = writer(ASYM4)
    ids = ref["input_ids"]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(ASYM4), peqa_config(meta))
    train_one_step(model, ids)
    expected = logits(model, ids)
    assert not torch.allclose(expected, ref["logits"])
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved and all("peqa_scale" in k for k in saved)
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import torch, peqa_peft
        from peft import AutoPeftModelForCausalLM
        model = AutoPeftModelForCausalLM.from_pretrained({str(tmp_path / "adapter")!r})
        ref = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            out = model(ref["ids"]).logits
        assert torch.equal(out, ref["logits"]), (out - ref["logits"]).abs().max()
        print("IDENTICAL")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert "IDENTICAL" in result.stdout, result.stderr[-3000:]
    merged = model.merge_and_unload()
    assert isinstance(merged.model.layers[0].self_attn.q_proj, QuantLinear)
    torch.testing.assert_close(logits(merged, ids), expected, rtol=1e-5, atol=1e-5)
    # the round trip of issue 9: compressed-tensors in, PEQA tunes the scales, compressed-tensors out, and plain
    # transformers in a process that never imports peqa_peft reproduces the tuned logits
    merged.save_pretrained(tmp_path / "merged")
    saved_config = json.loads((tmp_path / "merged" / "config.json").read_text())["quantization_config"]
    assert saved_config["quant_method"] == "compressed-tensors"
    # the canonical (vLLM) layout carries "dequantize": true, so plain from_pretrained reads it through
    # compressed-tensors' decompression into float weights (see docs/guides/export.md)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(reloaded, ids), expected, rtol=1e-5, atol=1e-5)
    from test_export import run_fresh

    got = run_fresh(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "merged")!r})
        with torch.no_grad():
            print(json.dumps(model(torch.tensor({ids.tolist()!r})).logits.tolist()))
        """,
        tmp_path,
    )
    torch.testing.assert_close(torch.tensor(got), expected, rtol=1e-5, atol=1e-5)


def test_partial_adoption_warns_that_the_model_cannot_be_saved_whole():
    meta, _ = writer(ASYM4)
    model = AutoModelForCausalLM.from_pretrained(ASYM4)
    with pytest.warns(UserWarning, match="not adopted by PEQA"):
        get_peft_model(model, PeqaConfig(bits=4, target_modules=["q_proj"]))
    assert model.config.quantization_config.quant_method == "compressed-tensors"


def test_adapter_refuses_a_base_with_another_grid(tmp_path):
    """Δs trained on the checkpoint's grid does not load onto the same model quantized by PEQA itself onto another
    grid (the symmetric checkpoint's zero-points are fixed, PEQA's asymmetric ones are not); it does load where
    PEQA's default reproduces the checkpoint's grid (per-channel asymmetric RTN: round-to-nearest on both sides)."""
    for fixture, fits in ((SYM4_G32, False), (ASYM4, True)):
        meta, ref = writer(fixture)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(fixture), peqa_config(meta))
        train_one_step(model, ref["input_ids"])
        model.save_pretrained(tmp_path / fixture.name)
        if fits:
            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(OTHER_BASE), tmp_path / fixture.name)
            continue
        with pytest.raises(ValueError, match="different quantized base"):
            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(OTHER_BASE), tmp_path / fixture.name)


# --- GPTQ-format layers, checked against an independent reference packing ------------------------------------------


def reference_gptq_pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ's packing written out element by element: column j's entries as one LSB-first bit stream of int32 words.

    ``values`` is ``(rows, cols)`` of unsigned ints; returns ``(rows * bits // 32, cols)`` int32 (rows packed).
    """
    rows, cols = values.shape
    words = torch.zeros(rows * bits // 32, cols, dtype=torch.int64)
    for i in range(rows):
        for b in range(bits):
            bit = i * bits + b
            words[bit // 32] |= ((values[i] >> b) & 1) << (bit % 32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


class FakeGptqLinear(nn.Module):
    """The buffers GPTQModel's / AutoGPTQ's QuantLinear hold, filled from known integers (v1 zero-points)."""

    def __init__(self, codes, scales, zeros, bits, g_idx, v2=False, bias=None):
        super().__init__()
        out_features, in_features = codes.shape
        self.bits, self.in_features, self.out_features = bits, in_features, out_features
        self.REQUIRES_FORMAT_V2 = v2
        stored_zeros = zeros if v2 else (zeros - 1) % 2**bits
        self.register_buffer("qweight", reference_gptq_pack(codes.t().long(), bits))
        self.register_buffer("qzeros", reference_gptq_pack(stored_zeros.t().long(), bits).t().contiguous())
        self.register_buffer("scales", scales.half())
        self.register_buffer("g_idx", g_idx.int())
        self.bias = bias


@pytest.mark.parametrize("bits,group_size,v2", [(2, 16, False), (3, 32, False), (4, None, True), (8, 32, False)])
def test_gptq_layers_are_adopted_exactly(bits, group_size, v2):
    gen = torch.Generator().manual_seed(bits)
    out_features, in_features = 32, 64
    n_groups = 1 if group_size is None else in_features // group_size
    codes = torch.randint(0, 2**bits, (out_features, in_features), generator=gen)
    zeros = torch.randint(0, 2**bits, (n_groups, out_features), generator=gen)
    zeros[0, 0] = 0  # v1 stores zero - 1: a zero of 0 wraps around
    scales = torch.rand(n_groups, out_features, generator=gen) * 0.1 + 0.01
    g_idx = torch.arange(in_features) // (group_size or in_features)
    bias = torch.randn(out_features, generator=gen)
    layer = FakeGptqLinear(codes, scales, zeros, bits, g_idx, v2=v2, bias=bias)
    config = PeqaConfig(bits=bits, group_size=group_size)
    gptq_backend.check(layer, config, "layer")
    adopted = gptq_backend.to_quant_linear(layer, config, "layer")
    gs = group_size or in_features
    expected = scales.half().float().t().repeat_interleave(gs, 1) * (codes - zeros.t().repeat_interleave(gs, 1))
    torch.testing.assert_close(adopted.dequantize(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(adopted.bias, bias)
    # PEQA's packed codes are the GPTQ words' own bytes, column by column
    assert torch.equal(adopted.qweight, layer.qweight.t().contiguous().view(torch.uint8).reshape(-1))


def test_gptq_model_becomes_peqa_and_act_order_is_refused():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (32, 64), generator=gen)
    zeros = torch.full((2, 32), 8)
    scales = torch.full((2, 32), 0.02)
    model = nn.Sequential(FakeGptqLinear(codes, scales, zeros, 4, torch.arange(64) // 32))
    x = torch.randn(3, 64, generator=gen)
    expected = x @ (0.02 * (codes - 8).float()).t()
    peft_model = get_peft_model(model, PeqaConfig(bits=4, group_size=32, target_modules=["0"]))
    torch.testing.assert_close(peft_model(x), expected, rtol=1e-3, atol=1e-3)
    shuffled = torch.randperm(64, generator=gen) // 32
    act_order = nn.Sequential(FakeGptqLinear(codes, scales, zeros, 4, shuffled))
    with pytest.raises(ValueError, match=r"layer '0'.*activation order \(desc_act=True"):
        get_peft_model(act_order, PeqaConfig(bits=4, group_size=32, target_modules=["0"]))
    assert isinstance(act_order[0], FakeGptqLinear)


def test_every_backend_module_has_the_dispatch_interface():
    from peqa_peft.tuners.peqa import backends

    for backend in backends.BACKENDS:
        assert all(callable(getattr(backend, f)) for f in ("matches", "check", "to_quant_linear")), backend.NAME
    assert backends.find_backend(nn.Embedding(3, 4)) is None
    assert peqa_peft.__name__ == "peqa_peft"
