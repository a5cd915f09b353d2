"""Issue 11: loading, merging and resuming refuse bad input instead of giving wrong results silently."""

import json

import pytest
import torch
from conftest import tiny_llama
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peqa_peft import PeqaConfig

IDS = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(0))


def peqa(bits=4, **config):
    # min-max init: these tests are about loading, and the clipping search is the slow part of building a model
    return PeqaConfig(bits=bits, init_method="minmax", task_type="CAUSAL_LM", **config)


def saved_adapter(path, bits=4):
    model = get_peft_model(tiny_llama(), peqa(bits, init_weights=False))
    model.save_pretrained(path)
    return model


def edit_weights(path, edit):
    file = path / "adapter_model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys(), "modules were replaced"
    assert all(torch.equal(after[k], before[k]) for k in before)


def assert_load_refused(path, message: str) -> None:
    """Loading the adapter at ``path`` onto a fresh base model raises ``message`` and leaves the model untouched."""
    base = tiny_llama()
    before = snapshot(base)
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(base, path)
    assert_untouched(base, before)


FIRST = "base_model.model.model.layers.0.self_attn.q_proj.peqa_scale"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.__setitem__(FIRST, t[FIRST].to(torch.int32)), "dtype torch.int32"),
        (lambda t: t[FIRST].__setitem__((0, 0), float("inf")), "NaN or inf"),
        (lambda t: t.pop(FIRST), "no scale delta for 1 of them"),
        (lambda t: t.__setitem__(FIRST, t[FIRST][:-1]), "has shape"),
        (
            lambda t: t.__setitem__(FIRST.replace("layers.0", "layers.7"), t[FIRST].clone()),
            "which this model does not have",
        ),
    ],
    ids=["int-dtype", "non-finite", "missing-layer", "wrong-shape", "unknown-layer"],
)
def test_from_pretrained_validates_before_touching_the_model(tmp_path, edit, message):
    saved_adapter(tmp_path)
    edit_weights(tmp_path, edit)
    assert_load_refused(tmp_path, message)


def test_corrupt_weights_file_leaves_the_model_untouched(tmp_path):
    saved_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    assert_load_refused(tmp_path, "cannot read the adapter weights")


@pytest.mark.parametrize("peft_type", ["LORA", "QFT"])
def test_peqa_weights_under_another_peft_type_are_refused(tmp_path, peft_type):
    saved_adapter(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["peft_type"] = peft_type
    config_file.write_text(json.dumps(config))
    assert_load_refused(tmp_path, f"PEQA scale deltas but adapter_config.json says peft_type={peft_type}")


def test_unknown_peft_type_is_one_clear_error(tmp_path):
    saved_adapter(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["peft_type"] = "NOT_A_METHOD"
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown peft_type 'NOT_A_METHOD'"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_wrongly_typed_fingerprint_is_one_clear_error(tmp_path):
    saved_adapter(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_fingerprint"] = ["not", "a", "mapping"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="`base_fingerprint` must be None or a mapping"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


@pytest.mark.parametrize("adapter_name", ["default", "other"])
def test_load_adapter_checks_the_fingerprint_under_any_name(tmp_path, adapter_name):
    """Loading into the existing 'default' slot (Trainer's resume path) used to skip the fingerprint."""
    saved_adapter(tmp_path, bits=4)
    model = get_peft_model(tiny_llama(), peqa(3))
    before = snapshot(model)
    with pytest.raises(ValueError, match="different quantized base|inconsistent"):
        model.load_adapter(tmp_path, adapter_name=adapter_name, is_trainable=True)
    assert_untouched(model, before)


def test_load_adapter_into_the_same_slot_of_the_same_base_works(tmp_path):
    trained = saved_adapter(tmp_path)
    with torch.no_grad():
        expected = trained(IDS).logits
    model = get_peft_model(tiny_llama(), peqa(4))
    model.load_adapter(tmp_path, adapter_name="default", is_trainable=True)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, expected)


def test_refused_safe_merge_changes_nothing():
    model = get_peft_model(tiny_llama(), peqa(4, init_weights=False))
    layers = [m for m in model.modules() if hasattr(m, "peqa_scale")]
    with torch.no_grad():
        layers[-1].peqa_scale["default"][0, 0] = float("inf")  # the last layer only: all others would merge
    before = snapshot(model)
    with pytest.raises(ValueError, match="nothing was merged"):
        model.merge_and_unload(safe_merge=True)
    assert_untouched(model, before)
    assert not any(m.merged for m in layers)
    with pytest.raises(ValueError, match="nothing was merged"):
        model.merge_adapter(safe_merge=True)
    assert_untouched(model, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_casting_keeps_the_quantization_grid(dtype):
    """``.half()``/``.to(bf16)`` used to cast s0 for good, after which every adapter's fingerprint differed."""
    model = get_peft_model(tiny_llama(), peqa(4, init_weights=False))
    layer = next(m for m in model.modules() if hasattr(m, "peqa_scale"))
    fingerprint = layer.base_fingerprint()
    with torch.no_grad():
        expected = model(IDS).logits
    model.to(dtype)
    base = layer.get_base_layer()
    assert base.scale.dtype == torch.float32 and base.zero_point.dtype == torch.uint8
    assert layer.base_fingerprint() == fingerprint
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits.float(), expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("train_dtype, load_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16)])
def test_adapter_moves_between_dtypes(tmp_path, train_dtype, load_dtype):
    """Quantized as stored, then cast: an adapter trained in one dtype loads onto the model cast to another."""
    trained = get_peft_model(tiny_llama(), peqa(4, init_weights=False)).to(train_dtype)
    trained.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = trained.float()(IDS).logits
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).to(load_dtype)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits.float(), expected, rtol=0.05, atol=0.05)


QFT_FIRST = "base_model.model.model.layers.0.self_attn.q_proj.qft_weight"


def _bad_index(t):
    t[f"{QFT_FIRST}.outlier_idx"][-1] = 64 * 64  # one past the end of the 64 x 64 weight


@pytest.mark.parametrize(
    "edit, message",
    [
        (_bad_index, "distinct sorted indices"),
        (lambda t: t[f"{QFT_FIRST}.scale"].__setitem__(0, float("nan")), "'scale' contains 1 NaN or inf"),
        (
            lambda t: t.__setitem__(f"{QFT_FIRST}.codes", t[f"{QFT_FIRST}.codes"].to(torch.int32)),
            "'codes' has dtype torch.int32; it must be uint8",
        ),
        (lambda t: t.pop(f"{QFT_FIRST}.outlier_val"), "lacks the QFT field"),
    ],
    ids=["outlier-index-out-of-range", "nan-scale", "int32-codes", "missing-field"],
)
def test_qft_checkpoints_are_validated_before_the_model_changes(tmp_path, edit, message):
    from peqa_peft import QftConfig

    get_peft_model(tiny_llama(), QftConfig(task_type="CAUSAL_LM")).save_pretrained(tmp_path)
    edit_weights(tmp_path, edit)
    assert_load_refused(tmp_path, message)
