"""PEQA under PEFT's generic loading paths: low_cpu_mem_usage (meta-device) loading and the adapter dtype under
autocast_adapter_dtype (regressions first found by PEFT's custom-model battery, scripts/peft_conformance.py)."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import peqa_peft  # noqa: F401
from peqa_peft import PeqaConfig


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
