"""PEQA as a PEFT method: wrapping, trainable parameters, adapters, merge, dtypes, errors, memory."""

import copy
import math

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from peft import PeftModel, get_peft_model

import peqa_peft
from peqa_peft import PeqaConfig, QuantLinear
from peqa_peft.core import fake_quantize, resolve_auto_init_method
from peqa_peft.tuners.peqa import PeqaLayer

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def fake_quant_copy(model, bits, group_size=None, skip=("lm_head",)):
    """The base model with every targeted Linear replaced by its dequantized PEQA initialisation (the default
    init_method "auto": the MSE search with groups, round-to-nearest per channel)."""
    ref = copy.deepcopy(model)
    method = resolve_auto_init_method(group_size)
    for name, module in ref.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith(skip):
            module.weight.data = fake_quantize(module.weight.data, bits, group_size, method)
    return ref


def peqa_layers(model):
    return [m for m in model.modules() if isinstance(m, PeqaLayer)]


def test_default_on_the_demo_model_is_per_channel_and_only_scales_train(demo_model):
    # group_size="auto": 32 does not divide the demo model's 688-wide down_proj, so the whole model is per channel
    model = get_peft_model(demo_model, PeqaConfig(bits=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    layers = peqa_layers(model)
    assert len(layers) == 42  # q,k,v,o,gate,up,down x 6 layers; lm_head excluded
    expected = sum(layer.out_features for layer in layers)
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == expected == 15936
    assert total == 6_843_648 + expected  # packed weights counted at their logical size
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".peqa_scale.default" in n for n in names)
    assert all(isinstance(layer.base_layer, QuantLinear) for layer in layers)


@pytest.mark.parametrize("group_size", [None, 16])
def test_trainable_count_is_out_features_times_groups(group_size):
    model = get_peft_model(tiny_llama(), PeqaConfig(bits=3, group_size=group_size))
    expected = sum(
        m.out_features * (1 if group_size is None else m.in_features // group_size) for m in peqa_layers(model)
    )
    assert model.get_nb_trainable_parameters()[0] == expected


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 32])
def test_fresh_adapter_reproduces_quantized_base(bits, group_size):
    base = tiny_llama()
    ref = fake_quant_copy(base, bits, group_size)
    model = get_peft_model(base, PeqaConfig(bits=bits, group_size=group_size))
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, rtol=1e-5, atol=1e-5)
        with model.disable_adapter():
            torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, rtol=1e-5, atol=1e-5)


def test_init_weights_false_is_not_identity():
    base = tiny_llama()
    ref = fake_quant_copy(base, 4, 32)  # the default "auto": group 32 on widths 64 and 128
    model = get_peft_model(base, PeqaConfig(bits=4, init_weights=False))
    with torch.no_grad():
        assert not torch.allclose(model(IDS).logits, ref(IDS).logits, atol=1e-3)
        with model.disable_adapter():
            torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, rtol=1e-5, atol=1e-5)


def test_float_weights_are_freed_and_layers_hold_packed_codes(demo_model):
    """Per wrapped layer: ceil(b*in/8) bytes per row + scales/zero-points + the adapter, nothing else resident."""
    for bits in (2, 3, 4, 8):
        model = get_peft_model(copy.deepcopy(demo_model), PeqaConfig(bits=bits))
        report = peqa_peft.quantized_layer_bytes(model)
        assert len(report) == 42
        for name, entry in report.items():
            layer = model.get_submodule(name)
            out_f, in_f = layer.out_features, layer.in_features
            assert entry["codes"] == out_f * math.ceil(bits * in_f / 8)
            assert entry["qparams"] == out_f * (4 + 1)  # fp32 s0 and uint8 z0, one group
            assert entry["adapter"] == out_f * 4  # fp32 delta_s
            assert entry["total"] == entry["codes"] + entry["qparams"] + entry["bias"] + entry["adapter"]
            assert entry["total"] < out_f * in_f * 4 / (32 / bits) + 16 * out_f
        assert not any(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if "layers." in n)


def test_gradients_reach_only_scales_and_match_reference():
    """delta_s.grad equals autograd through a dense dequantized copy of the same model."""
    base = tiny_llama()
    model = get_peft_model(base, PeqaConfig(bits=4, group_size=16, init_weights=False))
    out = model(IDS, labels=IDS)
    out.loss.backward()
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    got = layer.peqa_scale["default"].grad.clone()

    q = layer.base_layer
    codes = peqa_peft.core.unpack_codes(q.qweight, q.bits, q.out_features, q.in_features)
    delta = layer.peqa_scale["default"].detach().clone().requires_grad_(True)
    dense = peqa_peft.core.dequantize(codes, q.scale + delta, q.zero_point, q.group_size)
    x = torch.randn(3, q.in_features)
    grad_out = torch.randn(3, q.out_features)
    (x @ dense.t() * grad_out).sum().backward()
    layer.peqa_scale["default"].grad = None
    (layer(x) * grad_out).sum().backward()
    torch.testing.assert_close(layer.peqa_scale["default"].grad, delta.grad, rtol=1e-4, atol=1e-6)
    assert got.abs().sum() > 0


def test_multi_adapter_switching_and_deletion():
    base = tiny_llama()
    model = get_peft_model(base, PeqaConfig(bits=4, init_weights=False), adapter_name="task1")
    model.add_adapter("task2", PeqaConfig(bits=4, init_weights=False))
    with torch.no_grad():
        out_1 = model(IDS).logits
        model.set_adapter("task2")
        out_2 = model(IDS).logits
        assert not torch.allclose(out_1, out_2)
        with model.disable_adapter():
            plain = model(IDS).logits
        model.set_adapter("task1")
        torch.testing.assert_close(model(IDS).logits, out_1)
        trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {"task1"}
        model.delete_adapter("task1")
        assert model.active_adapters == ["task2"]
        torch.testing.assert_close(model(IDS).logits, out_2)
        with model.disable_adapter():
            torch.testing.assert_close(model(IDS).logits, plain)
    model.delete_adapter("task2")
    for layer in peqa_layers(model):
        assert len(layer.peqa_scale) == 0


def test_second_adapter_must_share_quantization():
    model = get_peft_model(tiny_llama(), PeqaConfig(bits=4))
    with pytest.raises(ValueError, match="share one quantized base"):
        model.add_adapter("other", PeqaConfig(bits=3))
    assert list(model.peft_config) == ["default"]


@pytest.mark.parametrize("train_zero_point", [False, True])
def test_merge_and_unload_gives_packed_model_with_same_logits(train_zero_point):
    model = get_peft_model(
        tiny_llama(), PeqaConfig(bits=3, group_size=32, init_weights=False, train_zero_point=train_zero_point)
    )
    with torch.no_grad():
        expected = model(IDS).logits
        model.merge_adapter()
        torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-5, atol=1e-5)
        merged = model.merge_and_unload(safe_merge=True)
        torch.testing.assert_close(merged(IDS).logits, expected, rtol=1e-5, atol=1e-5)
    qlayers = [m for m in merged.modules() if isinstance(m, QuantLinear)]
    assert len(qlayers) == 14 and not any(isinstance(m, PeqaLayer) for m in merged.modules())
    assert all(m.qweight.dtype == torch.uint8 for m in qlayers)


def test_safe_merge_refuses_broken_adapter():
    model = get_peft_model(tiny_llama(), PeqaConfig(bits=4))
    layer = peqa_layers(model)[0]
    with torch.no_grad():
        layer.peqa_scale["default"][0, 0] = float("nan")
    before = layer.base_layer.scale.clone()
    with pytest.raises(ValueError, match="NaN"):
        model.merge_and_unload(safe_merge=True)
    assert torch.equal(layer.base_layer.scale, before)


def test_unload_returns_quantized_base():
    base = tiny_llama()
    ref = fake_quant_copy(base, 4, 32)  # the default "auto": group 32 on widths 64 and 128
    model = get_peft_model(base, PeqaConfig(bits=4, init_weights=False))
    plain = model.unload()
    with torch.no_grad():
        torch.testing.assert_close(plain(IDS).logits, ref(IDS).logits, rtol=1e-5, atol=1e-5)


def test_conv1d_gpt2():
    base = tiny_gpt2()
    ids = IDS % 128
    with torch.no_grad():
        fp = base(ids).logits
    model = get_peft_model(base, PeqaConfig(bits=8, target_modules=["c_attn", "c_proj", "c_fc"]))
    assert len(peqa_layers(model)) == 8
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, fp, rtol=0.05, atol=0.05)
    model(ids, labels=ids).loss.backward()
    assert all(layer.peqa_scale["default"].grad is not None for layer in peqa_layers(model))


def test_target_selection_options():
    def wrapped(config):
        return {
            n.removeprefix("base_model.model.")
            for n, m in get_peft_model(tiny_llama(), config).named_modules()
            if isinstance(m, PeqaLayer)
        }

    assert wrapped(PeqaConfig(target_modules=["q_proj", "v_proj"])) == {
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    }
    assert len(wrapped(PeqaConfig(target_modules="all-linear", exclude_modules=["down_proj"]))) == 12
    assert wrapped(PeqaConfig(target_modules=["q_proj"], layers_to_transform=[1])) == {
        "model.layers.1.self_attn.q_proj"
    }
    model = get_peft_model(tiny_llama(), PeqaConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lm_head.modules_to_save" in n for n in trainable)


def test_bf16_model_and_autocast_and_to():
    model = get_peft_model(tiny_llama().to(torch.bfloat16), PeqaConfig(bits=4))
    layer = peqa_layers(model)[0]
    assert layer.peqa_scale["default"].dtype == torch.float32  # PEFT autocasts adapters to fp32
    out = model(IDS, labels=IDS)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert layer.peqa_scale["default"].grad.dtype == torch.float32
    fp32 = get_peft_model(tiny_llama(), PeqaConfig(bits=4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fp32(IDS, labels=IDS).loss
    loss.backward()
    assert torch.isfinite(loss)
    fp32.to(torch.float64)
    assert peqa_layers(fp32)[0].base_layer.qweight.dtype == torch.uint8


def test_gradient_checkpointing_gives_same_grads():
    grads = []
    for checkpointing in (False, True):
        base = tiny_llama()
        model = get_peft_model(base, PeqaConfig(bits=4, init_weights=False))
        torch.manual_seed(1)
        for layer in peqa_layers(model):
            torch.nn.init.normal_(layer.peqa_scale["default"], std=1e-3)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
        model(IDS, labels=IDS).loss.backward()
        grads.append(torch.cat([layer.peqa_scale["default"].grad.flatten() for layer in peqa_layers(model)]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_bad_inputs_leave_model_untouched():
    base = tiny_llama(intermediate_size=96)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match="does not divide in_features=96"):
        get_peft_model(base, PeqaConfig(bits=4, group_size=64))
    with pytest.raises(TypeError, match="embed_tokens.*Embedding"):
        get_peft_model(base, PeqaConfig(target_modules=["embed_tokens", "q_proj"]))
    with pytest.raises(ValueError, match="not found in the base model|did not match"):
        get_peft_model(base, PeqaConfig(target_modules=["no_such_module"]))
    assert not any(isinstance(m, (PeqaLayer, QuantLinear)) for m in base.modules())
    after = base.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    for bad in (dict(bits=1), dict(bits=16), dict(group_size=-8), dict(init_method="gptq"), dict(max_shrink=1.5)):
        with pytest.raises(ValueError):
            PeqaConfig(**bad)


def test_short_finetune_on_real_alpaca_lowers_loss(demo_model, demo_tokenizer, data_dir):
    """A few Adam steps on real Alpaca rows with only the scales trainable lower the training loss."""
    import json

    rows = json.loads((data_dir / "alpaca_en_demo.json").read_text())[:8]
    texts = [f"### Instruction:\n{r['instruction']}\n\n### Response:\n{r['output']}" for r in rows]
    batch = demo_tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=96)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model = get_peft_model(demo_model, PeqaConfig(bits=3, task_type="CAUSAL_LM"))
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(12):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_peft_model_from_pretrained_with_is_trainable(tmp_path):
    model = get_peft_model(tiny_llama(), PeqaConfig(bits=4, init_weights=False))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert loaded.get_nb_trainable_parameters()[0] == model.get_nb_trainable_parameters()[0]
    frozen = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert frozen.get_nb_trainable_parameters()[0] == 0
