"""bf16 inference through PyTorch's int4 weight-packed matmul (peqa_peft.core.int4mm).

Every result is compared with the plain PyTorch reference: the fp32 dequantized weight rounded to bf16, ``F.linear``
in bf16. Which path ran is read from the layer's int4 cache (built only by the int4 path).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn

from peqa_peft import PeqaConfig
from peqa_peft.core import QuantLinear, int4mm, kernels, unpack_codes

BF16 = torch.bfloat16
U = 2.0**-8  # bf16 unit roundoff (8-bit significand)


def _layer(in_features=256, out_features=48, group_size=64, bits=4, seed=0, bias=True) -> QuantLinear:
    torch.manual_seed(seed)
    layer = QuantLinear.from_linear(nn.Linear(in_features, out_features, bias=bias), bits, group_size, method="minmax")
    if bias:
        layer.bias.data.normal_()
    return layer.eval()


def _reference(layer: QuantLinear, x: torch.Tensor, scale=None, zero=None) -> torch.Tensor:
    """bf16 ``F.linear`` with the fp32 dequantized weight rounded to bf16."""
    scale = layer.scale if scale is None else scale
    zero = layer.zero_point if zero is None else zero
    from peqa_peft.core import dequantize_packed

    w = dequantize_packed(layer.qweight, 4, layer.out_features, layer.in_features, scale.float(), zero, torch.float32)
    return F.linear(x.to(BF16), w.to(BF16), None if layer.bias is None else layer.bias.to(BF16))


def _assert_bf16_close(y, ref, x, layer: QuantLinear, scale=None, zero=None) -> None:
    """Within bf16 rounding, weight by weight: the kernel's weight is ``bf16(s) * (q - z)`` plus the rounding of
    ``bf16(s) * (8 - z)`` (int4mm's module doc), the reference's is ``bf16(s * (q - z))``; each output is rounded
    to bf16 once more (twice where a bias is added)."""
    assert y.dtype == BF16 and y.shape == ref.shape
    g = layer.in_features // layer.scale.shape[1]
    s = (layer.scale if scale is None else scale).detach().float().repeat_interleave(g, 1)
    z = (layer.zero_point if zero is None else zero).detach().float().repeat_interleave(g, 1)
    q = unpack_codes(layer.qweight, 4, layer.out_features, layer.in_features).float()
    w_bound = 1.01 * U * (s.abs() * ((q - z).abs() + (8 - z).abs()) + 2 * (s * (q - z)).abs())
    bound = x.float().abs() @ w_bound.t() + 3 * U * ref.float().abs() + 1e-4
    err = (y.float() - ref.float()).abs()
    assert (err <= bound).all(), f"max error {err.max().item():.3g} above the bf16 bound"


def _uses_int4(layer: QuantLinear) -> bool:
    return layer.int4_cache_bytes() > 0


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("lead", [(1,), (3,), (7,), (2, 5), (1, 1)])
def test_forward_matches_bf16_reference(group_size, lead):
    layer = _layer(group_size=group_size)
    # a nonzero mean makes a wrong zero-point show up in full instead of averaging out over the row
    x = (torch.randn(*lead, layer.in_features) + 0.5).to(BF16)
    with torch.no_grad():
        y = layer(x)
    assert _uses_int4(layer)
    _assert_bf16_close(y, _reference(layer, x), x, layer)


def test_kernel_weight_error_against_fp32_dequantization():
    """The kernel's weight (read through an identity matrix) vs the fp32 dequantization: within one bf16 rounding
    of the scale, of the folded zero term and of the kernel's output, per weight."""
    layer = _layer(in_features=256, out_features=64, group_size=32, bias=False)
    eye = torch.eye(layer.in_features, dtype=BF16)
    with torch.no_grad():  # in calls of MAX_ROWS rows: longer inputs (prefill) are left to today's kernels
        w_kernel = torch.cat([layer(rows) for rows in eye.split(int4mm.MAX_ROWS)]).float().t()
    assert _uses_int4(layer)
    w_ref = layer.dequantize(torch.float32)
    s = layer.scale.repeat_interleave(32, 1)
    z = layer.zero_point.float().repeat_interleave(32, 1)
    q = w_ref / s + z
    # bf16(s) * (q - z), the rounding of bf16(s) * (8 - z), the rounding of the kernel's output
    bound = U * s * ((q - z).abs() + (8 - z).abs()) * 1.01 + U * w_ref.abs() * 1.01 + 1e-8
    assert ((w_kernel - w_ref).abs() <= bound).all()


def test_peqa_adapter_scales_are_folded_and_never_stale():
    """Δs changed between two eval forwards (in place, by .data, by merge, by disabling) is always served fresh."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(128, 64))
    peft_model = get_peft_model(model, PeqaConfig(bits=4, group_size=32, target_modules=["proj"], init_weights=False))
    peft_model = peft_model.to(BF16).eval()
    layer = peft_model.base_model.model.proj
    base = layer.base_layer
    x = (torch.randn(3, 128) + 0.5).to(BF16)

    def check():
        scale, zero = layer.merged_qparams()
        with torch.no_grad():
            y = peft_model(x)
        assert _uses_int4(base)
        _assert_bf16_close(y, _reference(base, x, scale.detach(), zero.detach()), x, base, scale, zero)
        return y

    y0 = check()
    delta = layer.peqa_scale["default"]
    with torch.no_grad():
        delta.add_(0.5 * base.scale.to(delta.dtype))  # in place: the version counter moves
    y1 = check()
    assert not torch.equal(y0, y1)
    delta.data = torch.zeros_like(delta)  # new storage under the same Parameter
    y2 = check()
    assert not torch.equal(y1, y2)
    with torch.no_grad():
        delta.copy_(0.2 * base.scale.to(delta.dtype))
    layer.merge()  # s0 += Δs in place; the forward now uses the base's own scales
    y3 = check()
    layer.unmerge()
    with peft_model.disable_adapter():
        y4 = check()
    y5 = check()
    torch.testing.assert_close(y3, y5, rtol=0, atol=0.05)
    assert not torch.equal(y4, y5)


def test_given_scales_without_sources_are_refolded_every_call():
    layer = _layer()
    x = torch.randn(2, layer.in_features, dtype=BF16)
    with torch.no_grad():
        for factor in (1.0, 2.0, 0.5):
            scale = layer.scale * factor
            y = layer(x, scale=scale, zero_point=layer.zero_point)
            _assert_bf16_close(y, _reference(layer, x, scale), x, layer, scale)
    assert _uses_int4(layer)


def test_base_scale_change_invalidates_and_train_frees_the_cache():
    layer = _layer()
    x = torch.randn(1, layer.in_features, dtype=BF16)
    with torch.no_grad():
        y0 = layer(x)
        layer.scale.mul_(1.5)
        y1 = layer(x)
    _assert_bf16_close(y1, _reference(layer, x), x, layer)
    assert not torch.equal(y0, y1)
    assert layer.int4_cache_bytes() == layer.out_features * layer.in_features // 2 + 2 * 2 * layer.scale.numel()
    layer.train()
    assert layer.int4_cache_bytes() == 0
    layer.eval()
    with torch.no_grad():
        layer(x)
    assert _uses_int4(layer)
    layer.to(torch.float32)  # .to() drops the device-specific copy
    assert layer.int4_cache_bytes() == 0


def test_inference_mode_and_autocast_take_the_int4_path():
    layer = _layer(group_size=32)
    x = torch.randn(4, layer.in_features)
    with torch.inference_mode():
        y = layer(x.to(BF16))
    assert _uses_int4(layer)
    _assert_bf16_close(y, _reference(layer, x), x, layer)
    with torch.no_grad():  # the cache built under inference_mode serves ordinary no_grad calls too
        torch.testing.assert_close(layer(x.to(BF16)), y, rtol=0, atol=0)
    layer.release_int4_cache()
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        y = layer(x)
    assert _uses_int4(layer) and y.dtype == BF16


def test_per_channel_uses_one_group_when_the_kernel_has_it():
    layer = _layer(in_features=64, out_features=32, group_size=None)
    x = torch.randn(5, 64, dtype=BF16)
    with torch.no_grad():
        y = layer(x)
    assert _uses_int4(layer)
    _assert_bf16_close(y, _reference(layer, x), x, layer)


def _fallback(layer: QuantLinear, x: torch.Tensor, *, grad: bool = False) -> None:
    """The layer must run today's kernels (no int4 cache) and give their result."""
    with torch.set_grad_enabled(grad):
        y = layer(x)
    assert not _uses_int4(layer)
    with torch.no_grad(), kernels.kernels("reference"):
        ref = layer(x)
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(bits=3),  # no int4 kernel for other widths
        dict(bits=8),
        dict(group_size=16),  # group sizes the kernel lacks
        dict(in_features=512, group_size=None),  # per channel, one group of 512: too long
        dict(out_features=40),  # CPU packing needs out_features % 16
    ],
)
def test_fallback_shapes(kwargs):
    layer = _layer(**kwargs)
    _fallback(layer, torch.randn(3, layer.in_features, dtype=BF16))


def test_fallback_long_inputs():
    layer = _layer()
    _fallback(layer, torch.randn(2, int4mm.MAX_ROWS // 2 + 1, layer.in_features, dtype=BF16))
    with torch.no_grad():
        layer(torch.randn(2, int4mm.MAX_ROWS // 2, layer.in_features, dtype=BF16))
    assert _uses_int4(layer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fallback_other_dtypes(dtype):
    layer = _layer()
    _fallback(layer, torch.randn(3, layer.in_features, dtype=dtype))


def test_fallback_train_mode_grad_switch_and_reference_mode():
    layer = _layer()
    x = torch.randn(2, layer.in_features, dtype=BF16)
    _fallback(layer.train(), x)  # train mode, even without grad
    layer.eval()
    _fallback(layer, x.clone().requires_grad_(), grad=True)  # a gradient is needed
    int4mm.set_enabled(False)
    try:
        _fallback(layer, x)
    finally:
        int4mm.set_enabled(True)
    with kernels.kernels("reference"):
        _fallback(layer, x)
    with pytest.raises(TypeError, match="bool"):
        int4mm.set_enabled(1)


def test_qparams_callable_needs_sources_and_excludes_scales():
    layer = _layer()
    x = torch.randn(1, layer.in_features, dtype=BF16)
    with pytest.raises(ValueError, match="qparams_sources"):
        layer(x, qparams=lambda: (layer.scale, layer.zero_point))
    with pytest.raises(ValueError, match="qparams_sources"):
        layer(x, scale=layer.scale, qparams=lambda: (layer.scale, layer.zero_point), qparams_sources=(layer.scale,))
