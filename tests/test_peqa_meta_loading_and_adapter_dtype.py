"""PEQA under PEFT's generic loading paths: low_cpu_mem_usage (meta-device) loading and the adapter dtype under
autocast_adapter_dtype (regressions first found by PEFT's custom-model battery, scripts/peft_conformance.py)."""

import pytest
import torch
from conftest import REPO
from peft import PeftModel, get_peft_model
from torch import nn

import peqa_peft  # noqa: F401
from peqa_peft import PeqaConfig

DEMO = REPO / "assets" / "demo-llama"


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 2)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x.to(self.lin0.bias.dtype))))


def make_mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return MLP().to(dtype)


def test_low_cpu_mem_usage_loading_keeps_biases_off_the_meta_device(tmp_path):
    model = get_peft_model(make_mlp(), PeqaConfig(target_modules=["lin0", "lin1"], init_weights=False))
    x = torch.randn(4, 10)
    expected = model(x)
    model.save_pretrained(tmp_path)
    for low_cpu_mem_usage in (False, True):
        loaded = PeftModel.from_pretrained(make_mlp(), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
        assert {p.device.type for p in loaded.parameters()} == {"cpu"}
        loaded.load_adapter(tmp_path, adapter_name="other", low_cpu_mem_usage=low_cpu_mem_usage)
        assert {p.device.type for p in loaded.parameters()} == {"cpu"}
        torch.testing.assert_close(loaded(x), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [True, False])
def test_adapter_dtype_follows_autocast_adapter_dtype(dtype, autocast):
    model = get_peft_model(make_mlp(dtype), PeqaConfig(target_modules=["lin0"]), autocast_adapter_dtype=autocast)
    model.add_adapter("other", PeqaConfig(target_modules=["lin0"]), autocast_adapter_dtype=autocast)
    deltas = [p for n, p in model.named_parameters() if "peqa_scale" in n]
    assert deltas and all(p.dtype == (torch.float32 if autocast else dtype) for p in deltas)
    model(torch.randn(3, 10)).float().sum().backward()
    assert model.base_model.model.lin0.peqa_scale["default"].grad is not None


def _saved_float32_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32)
    base.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_adapter_trained_in_float32_loads_onto_a_bfloat16_base_of_the_same_checkpoint(tmp_path):
    """The bf16 base is quantized from the stored float32 weights, so the codes (and the fingerprint) match."""
    from transformers import AutoModelForCausalLM

    path = _saved_float32_checkpoint(tmp_path)
    fp32 = get_peft_model(AutoModelForCausalLM.from_pretrained(path), PeqaConfig(task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in fp32.named_parameters():
            if "peqa_scale" in name:
                p.normal_(0, 1e-3)
    fp32.save_pretrained(tmp_path / "adapter")
    bf16 = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16), tmp_path / "adapter"
    )
    for (name, a), (_, b) in zip(fp32.named_modules(), bf16.named_modules()):
        if hasattr(a, "qweight"):
            assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scale, b.scale), name
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(bf16(ids).logits.float(), fp32(ids).logits, atol=0.15, rtol=0.05)


def test_bfloat16_base_without_a_reachable_checkpoint_is_still_refused(tmp_path):
    """A base whose stored weights cannot be found (built in memory) keeps the clear fingerprint refusal."""
    from transformers import AutoModelForCausalLM

    path = _saved_float32_checkpoint(tmp_path)
    get_peft_model(AutoModelForCausalLM.from_pretrained(path), PeqaConfig(task_type="CAUSAL_LM")).save_pretrained(
        tmp_path / "adapter"
    )
    bf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    bf16.name_or_path = bf16.config._name_or_path = ""
    with pytest.raises(ValueError, match="different quantized base"):
        PeftModel.from_pretrained(bf16, tmp_path / "adapter")


def test_a_weight_changed_in_memory_is_not_replaced_by_the_stored_one(tmp_path):
    from transformers import AutoModelForCausalLM

    from peqa_peft.integrations.transformers.stored_weights import StoredWeights

    path = _saved_float32_checkpoint(tmp_path)
    bf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    stored = StoredWeights(bf16)
    q_proj = bf16.model.layers[0].self_attn.q_proj
    assert stored.weight_for("model.layers.0.self_attn.q_proj", q_proj).dtype == torch.float32
    with torch.no_grad():
        q_proj.weight[0, 0] += 1
    assert stored.weight_for("model.layers.0.self_attn.q_proj", q_proj) is None


def test_a_checkpoint_stored_in_16_bits_is_not_read_back(tmp_path):
    """Stored bf16 is no more precise than the loaded bf16: the header's dtype says so, the tensor is not read."""
    from transformers import AutoModelForCausalLM

    from peqa_peft.integrations.transformers.stored_weights import StoredWeights

    AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    q_proj = bf16.model.layers[0].self_attn.q_proj
    assert StoredWeights(bf16).weight_for("model.layers.0.self_attn.q_proj", q_proj) is None
