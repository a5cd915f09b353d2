"""The quantization core against plain PyTorch references."""

import pytest
import torch
from safetensors.torch import load_file

from peqa_peft.core import (
    QuantLinear,
    compute_qparams,
    dequantize,
    dequantize_packed,
    fake_quantize,
    pack_bits,
    packed_linear,
    packed_numel,
    quantize,
    unpack_bits,
    unpack_codes,
)

BITS = (2, 3, 4, 8)
GROUPS = (None, 32)


def reference_minmax(w: torch.Tensor, bits: int, group_size):
    """Loop-per-group asymmetric min/max RTN, written independently of the library."""
    out_f, in_f = w.shape
    gs = in_f if group_size is None else group_size
    maxq = 2**bits - 1
    codes = torch.empty_like(w, dtype=torch.uint8)
    scales = torch.empty(out_f, in_f // gs)
    zeros = torch.empty(out_f, in_f // gs)
    for i in range(out_f):
        for g in range(in_f // gs):
            x = w[i, g * gs : (g + 1) * gs]
            lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
            s = (hi - lo) / maxq
            z = min(max(round(-lo / s), 0), maxq)
            q = torch.clamp(torch.round(x / s) + z, 0, maxq)
            codes[i, g * gs : (g + 1) * gs] = q.to(torch.uint8)
            scales[i, g], zeros[i, g] = s, z
    return codes, scales, zeros


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUPS)
def test_minmax_matches_reference(bits, group_size):
    torch.manual_seed(bits)
    w = torch.randn(16, 64)
    scale, zero = compute_qparams(w, bits, group_size, method="minmax")
    codes = quantize(w, scale, zero, bits, group_size)
    ref_codes, ref_scale, ref_zero = reference_minmax(w, bits, group_size)
    torch.testing.assert_close(scale, ref_scale)
    torch.testing.assert_close(zero, ref_zero)
    # float32 rounding of w/s can differ from the Python-float reference by one step at exact .5 ties
    assert (codes.int() - ref_codes.int()).abs().max() <= 1
    assert (codes != ref_codes).float().mean() < 0.01
    w_hat = dequantize(codes, scale, zero, group_size)
    ref_w_hat = (ref_codes.float().view(16, -1, 64 // scale.shape[1]) - ref_zero[..., None]) * ref_scale[..., None]
    torch.testing.assert_close(w_hat, ref_w_hat.view(16, 64), atol=scale.max().item() * 1.01, rtol=0)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUPS)
def test_codes_in_range_and_error_bounded(bits, group_size):
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    scale, zero = compute_qparams(w, bits, group_size)
    codes = quantize(w, scale, zero, bits, group_size)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    assert torch.equal(zero, zero.round()) and zero.min() >= 0 and zero.max() <= 2**bits - 1
    err = (dequantize(codes, scale, zero, group_size) - w).abs()
    # inside the clipped range the error is at most half a step; clipped entries may be off by more
    inside = err <= scale.repeat_interleave(128 // scale.shape[1], dim=1) / 2 + 1e-6
    assert inside.float().mean() > 0.9


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [None, 128])
def test_mse_search_beats_minmax_on_real_weights(demo_model, bits, group_size):
    """The clipping search lowers ||W - W_hat||_F^2 on every layer kind of the pretrained demo model."""
    layer = demo_model.model.layers[2]
    for linear in (layer.self_attn.q_proj, layer.mlp.gate_proj):
        w = linear.weight.detach()
        err_mse = (fake_quantize(w, bits, group_size, "mse") - w).pow(2).sum()
        err_rtn = (fake_quantize(w, bits, group_size, "minmax") - w).pow(2).sum()
        assert err_mse <= err_rtn
        if bits <= 4:
            assert err_mse < 0.97 * err_rtn


def test_mse_search_fits_a_grid_wider_than_the_groups_range():
    """Values on an integer-zero-point grid that leave its top code unused: round-to-nearest over their range
    (scale 14/15 of the grid's) misses it, a grid 15/14 wider, centred and rounded, reproduces it exactly."""
    step, zero = 0.01, 7.0
    codes = torch.arange(0, 15).float()  # codes 0..14 of 0..15
    w = ((codes - zero) * step).repeat(3, 2)  # 3 rows x 2 groups of 15
    scale, z = compute_qparams(w, 4, 15, "mse", grid=14, max_shrink=0.5)  # ratios 1 + 1/14 = 15/14 among them
    torch.testing.assert_close(dequantize(quantize(w, scale, z, 4, 15), scale, z, 15), w, rtol=0, atol=1e-7)
    assert torch.equal(z, torch.full_like(z, zero))
    rtn = fake_quantize(w, 4, 15, "minmax")
    assert (rtn - w).abs().max() > step / 10


def test_constant_and_zero_rows_are_exact():
    w = torch.zeros(4, 8)
    w[1] = 0.5
    w[2] = -2.0
    for bits in BITS:
        assert torch.allclose(fake_quantize(w, bits, None, "minmax"), w, atol=1e-6)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(7, 13), (16, 64), (1, 1), (3, 8)])
def test_pack_unpack_round_trip(bits, shape):
    torch.manual_seed(bits)
    codes = torch.randint(0, 2**bits, shape, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    n = codes.numel()
    assert packed.dtype == torch.uint8 and packed.numel() == packed_numel(n, bits)
    if n % 8 == 0:
        assert packed.numel() * 8 == n * bits  # exactly b bits per code
    assert torch.equal(unpack_bits(packed, bits, n).view(shape), codes)


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match="out of range"):
        pack_bits(torch.tensor([0, 8], dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="packed bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 8)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_grads_match_dequantized_reference(bits, group_size, dtype):
    """Forward and all three gradients of the fused op equal autograd through a dense dequantized weight.

    Runs the uncompiled kernels (same algorithm, no compile time); tests/test_fast_paths.py covers the compiled ones.
    """
    from peqa_peft.core import kernels

    torch.manual_seed(0)
    out_f, in_f = 48, 64
    codes = torch.randint(0, 2**bits, (out_f, in_f), dtype=torch.uint8)
    n_groups = 1 if group_size is None else in_f // group_size
    scale = (torch.rand(out_f, n_groups) * 0.1 + 0.01).requires_grad_(True)
    zero = torch.randint(0, 2**bits, (out_f, n_groups)).float().requires_grad_(True)
    x = torch.randn(2, 5, in_f, dtype=dtype, requires_grad=True)
    bias = torch.randn(out_f)
    with kernels.kernels("eager"):
        y = packed_linear(x, pack_bits(codes, bits), scale, zero, bits, out_f, in_f, bias)
        grad_out = torch.randn_like(y)
        (y * grad_out).sum().backward()

    s_ref, z_ref = scale.detach().clone().requires_grad_(True), zero.detach().clone().requires_grad_(True)
    x_ref = x.detach().float().requires_grad_(True)
    y_ref = x_ref @ dequantize(codes, s_ref, z_ref, group_size).t() + bias
    (y_ref * grad_out.float()).sum().backward()

    def tol(ref):  # bf16 keeps ~3 significant digits: compare relative to the tensor's magnitude
        if dtype == torch.bfloat16:
            return dict(rtol=2e-2, atol=1e-2 * ref.abs().max().item())
        return dict(rtol=1e-4, atol=1e-4)

    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), y_ref, **tol(y_ref))
    torch.testing.assert_close(x.grad.float(), x_ref.grad, **tol(x_ref.grad))
    torch.testing.assert_close(scale.grad, s_ref.grad, **tol(s_ref.grad))
    torch.testing.assert_close(zero.grad, z_ref.grad, **tol(z_ref.grad))


@pytest.mark.parametrize("group_size", GROUPS)
def test_scale_backward_never_builds_a_full_weight_gradient(monkeypatch, group_size):
    """Weight-sized tensors exist only a block of rows at a time; per channel no weight gradient exists at all."""
    from peqa_peft.core import functional, kernels

    monkeypatch.setattr(functional, "_BLOCK_ELEMENTS", 64 * 4)  # 4 rows of 64 inputs
    dequant_rows, grad_blocks = [], []
    real_dequant, real_dot = kernels.dequant_planes, kernels.group_dot

    def dequant(packed, scale, zero, bits, rows, *args):
        dequant_rows.append(rows)
        return real_dequant(packed, scale, zero, bits, rows, *args)

    def group_dot(dw, *args):
        grad_blocks.append(tuple(dw.shape))
        return real_dot(dw, *args)

    monkeypatch.setattr(kernels, "dequant_planes", dequant)
    monkeypatch.setattr(kernels, "group_dot", group_dot)
    codes = torch.randint(0, 16, (32, 64), dtype=torch.uint8)
    n_groups = 1 if group_size is None else 64 // group_size
    scale = torch.full((32, n_groups), 0.01, requires_grad=True)
    x = torch.randn(3, 64, requires_grad=True)
    with kernels.kernels("eager"):
        y = packed_linear(x, pack_bits(codes, 4), scale, torch.full((32, n_groups), 8.0), 4, 32, 64)
        y.sum().backward()
    assert dequant_rows and all(rows <= 4 for rows in dequant_rows)
    if group_size is None:
        assert not grad_blocks  # dL/ds comes from the saved y0, no G^T X at all
    else:
        assert grad_blocks and all(rows * cols <= 64 * 4 for rows, cols in grad_blocks)
    assert scale.grad.shape == (32, n_groups) and x.grad.shape == x.shape


def test_quant_linear_from_linear_and_conv1d():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    q = QuantLinear.from_linear(linear, 4, 16)
    x = torch.randn(5, 64)
    ref = x @ fake_quantize(linear.weight.detach(), 4, 16).t() + linear.bias
    torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)
    conv = Conv1D(32, 64)  # nf=out, nx=in; weight stored (in, out)
    conv.weight.data.normal_()
    qc = QuantLinear.from_linear(conv, 4, 16)
    ref_c = x @ fake_quantize(conv.weight.detach().t(), 4, 16).t() + conv.bias
    torch.testing.assert_close(qc(x), ref_c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qc.dequantize(), dequantize_packed(qc.qweight, 4, 32, 64, qc.scale, qc.zero_point))
    assert torch.equal(unpack_codes(qc.qweight, 4, 32, 64), quantize(conv.weight.t(), qc.scale, qc.zero_point, 4, 16))
    with pytest.raises(TypeError, match="nn.Linear or transformers Conv1D"):
        QuantLinear.from_linear(torch.nn.Embedding(3, 4), 4)


def test_quant_linear_state_dict_round_trip(tmp_path):
    from safetensors.torch import save_file

    q = QuantLinear.from_linear(torch.nn.Linear(64, 16), 3, 32)
    save_file(q.state_dict(), tmp_path / "q.safetensors")
    fresh = QuantLinear(64, 16, 3, 32)
    fresh.load_state_dict(load_file(tmp_path / "q.safetensors"))
    x = torch.randn(2, 64)
    assert torch.equal(fresh(x), q(x))
    assert fresh.fingerprint() == q.fingerprint()


def test_quant_linear_autocast_and_dtypes():
    q = QuantLinear.from_linear(torch.nn.Linear(64, 16), 4)
    x = torch.randn(2, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert q(x).dtype == torch.bfloat16
    assert q(x.double()).dtype == torch.float64
    q_bf16 = q.to(torch.bfloat16)  # casting never changes the quantization grid: s0 stays float32
    assert q_bf16.qweight.dtype == torch.uint8 and q_bf16.scale.dtype == torch.float32
    assert q_bf16.bias.dtype == torch.bfloat16
    assert q_bf16(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("bad", [1, 9, 4.0, "4", True])
def test_bad_bits(bad):
    with pytest.raises(ValueError, match="bits"):
        compute_qparams(torch.randn(4, 8), bad)


def test_bad_group_size():
    with pytest.raises(ValueError, match="does not divide"):
        compute_qparams(torch.randn(4, 12), 4, group_size=8)
    with pytest.raises(ValueError, match="positive int"):
        compute_qparams(torch.randn(4, 12), 4, group_size=0)


def test_fractional_zero_point_checkpoint_keeps_its_dtype():
    q = QuantLinear.from_linear(torch.nn.Linear(16, 4), 4)
    assert q.zero_point.dtype == torch.uint8
    state = q.state_dict()
    state["zero_point"] = state["zero_point"].float() + 0.25
    fresh = QuantLinear(16, 4, 4)
    fresh.load_state_dict(state)
    assert fresh.zero_point.dtype == torch.float32 and torch.equal(fresh.zero_point, state["zero_point"])


def test_fingerprint_sees_fractional_zero_points():
    """GGUF Q4_1 / K-quant layers carry fractional zero-points (-m/d): two grids that differ only there must not
    share a fingerprint (an int16 cast used to truncate them), while integral zero-points hash as they always did."""
    torch.manual_seed(0)
    q = QuantLinear.from_linear(torch.nn.Linear(64, 8), bits=4, group_size=32)
    integral = q.fingerprint()
    q.zero_point = q.zero_point.float()  # same values, float storage: same fingerprint
    assert q.fingerprint() == integral
    q.zero_point = q.zero_point + 0.25
    a = q.fingerprint()
    q.zero_point = q.zero_point + 0.25
    assert q.fingerprint() not in (a, integral)
