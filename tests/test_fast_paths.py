"""The fast paths of the packed linear op against the plain-PyTorch reference (``PEQA_KERNELS=reference``).

Reference = dequantize the codes in float and let autograd differentiate ``F.linear``. Every fast path (the
compiled kernels and the same kernels uncompiled) must give the same forward and the same gradients for ``x``,
``scale`` and ``zero_point``, for 2/3/4/8 bits, per channel and grouped, fp32 and bf16, with a bias; and the
no-grad single-row decode kernel the same output. Compiling costs a few seconds per kernel and shape, so the
default run compiles a representative subset and the full compiled matrix is marked slow.
"""

from __future__ import annotations

import pytest
import torch

from peqa_peft.core import QuantLinear, kernels, pack_bits, packed_linear
from peqa_peft.core.quantizer import compute_qparams

BITS = (2, 3, 4, 8)
OUT_F, IN_F, GROUP = 48, 64, 32
FAST_COMPILED = {(4, None, torch.float32), (3, GROUP, torch.float32), (4, GROUP, torch.bfloat16)}


@pytest.fixture(autouse=True)
def compile_small_layers(monkeypatch):
    """The test layers are tiny: make the compiled mode compile them anyway (it skips small layers by default)."""
    monkeypatch.setattr(kernels, "COMPILE_MIN_WEIGHTS", 0)


def _case(bits, group_size, seed=0):
    torch.manual_seed(seed)
    n_groups = 1 if group_size is None else IN_F // group_size
    codes = torch.randint(0, 2**bits, (OUT_F, IN_F), dtype=torch.uint8)
    scale = torch.rand(OUT_F, n_groups) * 0.1 + 0.01
    # a trained zero-point is fractional: the float path must handle it
    zero = torch.randint(0, 2**bits, (OUT_F, n_groups)).float() + torch.rand(OUT_F, n_groups) * 0.5
    return pack_bits(codes, bits), scale, zero, torch.randn(OUT_F)


def _run(mode, bits, group_size, dtype, x, packed, scale, zero, bias, grad_out):
    """Forward and the three gradients under kernel ``mode``."""
    x = x.detach().clone().requires_grad_(True)
    s, z = scale.clone().requires_grad_(True), zero.clone().requires_grad_(True)
    with kernels.kernels(mode):
        y = packed_linear(x, packed, s, z, bits, OUT_F, IN_F, bias)
        (y.float() * grad_out).sum().backward()
    return y, x.grad, s.grad, z.grad


def _tol(dtype, ref):
    if dtype == torch.bfloat16:  # ~3 significant digits: relative to the tensor's magnitude
        return dict(rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    return dict(rtol=1e-4, atol=1e-5 * max(1.0, ref.abs().max().item()))


def _check(mode, bits, group_size, dtype):
    packed, scale, zero, bias = _case(bits, group_size)
    x = torch.randn(2, 5, IN_F).to(dtype)
    grad_out = torch.randn(2, 5, OUT_F)
    fast = _run(mode, bits, group_size, dtype, x, packed, scale, zero, bias, grad_out)
    ref = _run("reference", bits, group_size, dtype, x, packed, scale, zero, bias, grad_out)
    assert fast[0].dtype == dtype
    for name, a, b in zip(("output", "grad x", "grad scale", "grad zero_point"), fast, ref):
        tol = _tol(dtype, b.float())
        torch.testing.assert_close(a.float(), b.float(), **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_size", [None, GROUP])
@pytest.mark.parametrize("bits", BITS)
def test_eager_kernels_match_reference(bits, group_size, dtype):
    _check("eager", bits, group_size, dtype)


@pytest.mark.parametrize(
    "bits,group_size,dtype",
    [
        pytest.param(b, g, d, marks=() if (b, g, d) in FAST_COMPILED else pytest.mark.slow)
        for b in BITS
        for g in (None, GROUP)
        for d in (torch.float32, torch.bfloat16)
    ],
)
def test_compiled_kernels_match_reference(bits, group_size, dtype):
    _check("compiled", bits, group_size, dtype)
    assert kernels.kernel_mode() != "eager", "compiling failed and the kernels fell back to eager"


def _decode_check(mode, bits, group_size, dtype):
    packed, scale, zero, bias = _case(bits, group_size, seed=1)
    x = torch.randn(1, 1, IN_F).to(dtype)
    with torch.no_grad():
        with kernels.kernels(mode):
            y = packed_linear(x, packed, scale, zero, bits, OUT_F, IN_F, bias)
        with kernels.kernels("reference"):
            ref = packed_linear(x, packed, scale, zero, bits, OUT_F, IN_F, bias)
    assert y.shape == ref.shape == (1, 1, OUT_F) and y.dtype == dtype
    torch.testing.assert_close(y.float(), ref.float(), **_tol(dtype, ref.float()))


@pytest.mark.parametrize("group_size", [None, GROUP])
@pytest.mark.parametrize("bits", BITS)
def test_decode_kernel_matches_reference(bits, group_size):
    _decode_check("eager", bits, group_size, torch.float32)
    if (bits, group_size) in {(4, None), (3, None), (4, GROUP)}:
        _decode_check("compiled", bits, group_size, torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_size", [None, GROUP])
@pytest.mark.parametrize("bits", BITS)
def test_compiled_decode_kernel_matches_reference(bits, group_size, dtype):
    _decode_check("compiled", bits, group_size, dtype)


def test_decode_kernel_is_taken_for_one_row_without_grad(monkeypatch):
    """model.eval() + no_grad batch-1 decoding runs the fused product, never the dequantize-then-matmul path."""
    calls = {"decode": 0, "dequant": 0}
    real_decode, real_dequant = kernels.decode_product, kernels.dequant_planes

    def decode(*args):
        calls["decode"] += 1
        return real_decode(*args)

    def dequant(*args):
        calls["dequant"] += 1
        return real_dequant(*args)

    monkeypatch.setattr(kernels, "decode_product", decode)
    monkeypatch.setattr(kernels, "dequant_planes", dequant)
    layer = QuantLinear.from_linear(torch.nn.Linear(IN_F, OUT_F), 4, method="minmax").eval()
    with torch.no_grad(), kernels.kernels("eager"):
        layer(torch.randn(1, 1, IN_F))
        assert calls == {"decode": 1, "dequant": 0}
        layer(torch.randn(1, 3, IN_F))  # prefill: several rows take the blocked dequantize + matmul
    assert calls["decode"] == 1 and calls["dequant"] >= 1


@pytest.mark.parametrize("bits,in_features,group_size", [(3, 12, None), (3, 24, 12), (2, 6, None), (4, 10, 5)])
def test_shapes_outside_plane_order_fall_back_to_natural_order(bits, in_features, group_size):
    """Rows or groups that are not whole packing units (in % k, group % k) still give the reference results."""
    assert kernels.plane_width(bits, in_features, group_size) == 1
    torch.manual_seed(0)
    out_features = 5
    n_groups = 1 if group_size is None else in_features // group_size
    packed = pack_bits(torch.randint(0, 2**bits, (out_features, in_features)), bits)
    scale = (torch.rand(out_features, n_groups) + 0.1).requires_grad_(True)
    zero = torch.full((out_features, n_groups), 1.0)
    x = torch.randn(3, in_features, requires_grad=True)
    outs = {}
    for mode in ("eager", "reference"):
        xs, ss = x.detach().clone().requires_grad_(True), scale.detach().clone().requires_grad_(True)
        with kernels.kernels(mode):
            y = packed_linear(xs, packed, ss, zero, bits, out_features, in_features)
            y.pow(2).sum().backward()
        outs[mode] = (y, xs.grad, ss.grad)
    for a, b in zip(outs["eager"], outs["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_plane_order_round_trip():
    x = torch.randn(3, 24)
    for k in (1, 2, 4, 8):
        assert torch.equal(kernels.from_planes(kernels.to_planes(x, k), k), x)
    # plane c holds columns c, c + k, ...: column i * k + c of x lands at c * (24 // k) + i
    assert torch.equal(kernels.to_planes(torch.arange(8.0), 4), torch.tensor([0.0, 4, 1, 5, 2, 6, 3, 7]))


def test_small_layers_are_not_compiled(monkeypatch):
    monkeypatch.setattr(kernels, "COMPILE_MIN_WEIGHTS", 1 << 18)
    with kernels.kernels("compiled"):
        assert kernels.compiles(1 << 18) and not kernels.compiles(OUT_F * IN_F)
    with kernels.kernels("eager"):
        assert not kernels.compiles(1 << 30)


def test_kernel_mode_validation(monkeypatch):
    with pytest.raises(ValueError, match="kernel mode"):
        kernels.set_kernel_mode("fast")
    monkeypatch.setattr(kernels, "_mode", None)
    monkeypatch.setenv("PEQA_KERNELS", "turbo")
    with pytest.raises(ValueError, match="PEQA_KERNELS"):
        kernels.kernel_mode()
    monkeypatch.setenv("PEQA_KERNELS", "reference")
    assert kernels.kernel_mode() == "reference"


@pytest.mark.parametrize("bits,group_size", [(4, None), (3, 16)])
def test_fused_mse_search_matches_candidate_loop(bits, group_size):
    """All clipping candidates in one compiled pass choose the same scales as the one-candidate-at-a-time loop."""
    torch.manual_seed(0)
    w = torch.randn(40, 64) * torch.rand(40, 1)
    w[3] = 0.0  # a constant row: the degenerate-range rule
    with kernels.kernels("compiled"):
        fused = compute_qparams(w, bits, group_size)
    assert kernels.kernel_mode() == "compiled"
    with kernels.kernels("eager"):
        loop = compute_qparams(w, bits, group_size)
    torch.testing.assert_close(fused, loop, rtol=0, atol=0)


def test_compiled_kernels_leave_dynamos_recompile_limit_alone(monkeypatch):
    """A PEQA forward in compiled mode raises dynamo's recompile limit only while its kernel may compile: the
    process-wide value a user's own ``torch.compile`` reads is the same before and after."""
    seen = []

    def fake_compile(fn, **options):  # records the limit each compiled call runs under; computes eagerly
        def run(*args):
            seen.append(torch._dynamo.config.recompile_limit)
            return fn(*args)

        return run

    monkeypatch.setattr(kernels, "_compiled", {})
    monkeypatch.setattr(kernels, "_compiled_signatures", set())
    monkeypatch.setattr(kernels.torch, "compile", fake_compile)
    packed, scale, zero, bias = _case(4, None)
    x = torch.randn(3, IN_F)
    # config.patch, not monkeypatch: monkeypatch's undo leaves dynamo's config module without the key (later
    # torch.compile calls then fail with "recompile_limit does not exist")
    with torch._dynamo.config.patch(recompile_limit=8), kernels.kernels("compiled"):
        first = packed_linear(x, packed, scale, zero, 4, OUT_F, IN_F, bias)
        again = packed_linear(x, packed, scale, zero, 4, OUT_F, IN_F, bias)
        assert torch._dynamo.config.recompile_limit == 8
    with kernels.kernels("reference"):
        ref = packed_linear(x, packed, scale, zero, 4, OUT_F, IN_F, bias)
    assert seen[0] == kernels._RECOMPILE_LIMIT  # the first call with a signature may compile: raised for it
    assert seen[-1] == 8  # a repeated signature has its graph: the user's setting
    torch.testing.assert_close(first, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, first)
