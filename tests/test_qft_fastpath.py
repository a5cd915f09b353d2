"""QFT's chunked fast paths against plain dense PyTorch references (forward, every gradient, the IntLion update)."""

import math
import warnings

import pytest
import torch
from torch import nn

from peqa_peft import IntLion
from peqa_peft.core import chunks
from peqa_peft.core.stochastic import counter_key, counter_uniform, key_tensor
from peqa_peft.optim import dequantize_blockwise, quantize_blockwise
from peqa_peft.tuners.qft import Int8Grad, QftWeight, qft_linear


@pytest.fixture(params=[7, 1 << 30], ids=["many-chunks", "one-chunk"])
def chunk(request, monkeypatch):
    """Run the test with tiny chunks (many ranges, ragged ends) and with one chunk per weight."""
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", request.param)
    return request.param


def _weight(out=37, inp=29, int8=True, seed=0) -> nn.Parameter:
    torch.manual_seed(seed)
    return nn.Parameter(QftWeight.from_float(torch.randn(out, inp), 0.03, int8_grad=int8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("int8", [True, False])
def test_linear_matches_dense_reference(chunk, dtype, int8):
    """Reference: the dense dequantized weight in the activation dtype, through plain autograd."""
    weight = _weight(int8=int8)
    dense = weight.dequantize(dtype).clone().requires_grad_(True)
    x = torch.randn(3, 5, 29, dtype=dtype)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1 = qft_linear(x1, weight)
    y2 = x2 @ dense.t()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert y1.dtype == dtype and torch.allclose(y1, y2, atol=tol, rtol=tol)
    g = torch.randn_like(y2)
    y1.backward(g)
    y2.backward(g)
    assert x1.grad.dtype == dtype and torch.allclose(x1.grad, x2.grad, atol=tol * 4, rtol=tol)
    if int8:
        ref = Int8Grad.from_float(dense.grad)
        assert torch.allclose(weight.grad.scale, ref.scale, rtol=tol)
        assert (weight.grad.codes.int() - ref.codes.int()).abs().max() <= (0 if dtype == torch.float32 else 2)
    else:
        assert weight.grad.dtype == weight.dtype  # a gradient has its param's dtype
        assert torch.allclose(weight.grad, dense.grad.float(), atol=tol * 4, rtol=tol)


def _reference_lion(w: QftWeight, grad: torch.Tensor, m_codes, m_absmax, lr, wd, betas, seed, stream, step):
    """IntLion's QFT update written densely, from its definition (independent of the chunked implementation)."""
    g = grad.float()
    m = dequantize_blockwise(m_codes, m_absmax, w.shape) if m_codes is not None else torch.zeros(w.shape)
    d = torch.sign(m * betas[0] + g * (1 - betas[0]))
    m = m * betas[1] + g * (1 - betas[1])
    codes = w.codes.float()
    update = d * (-lr / w.scale) - lr * wd * (codes - w.zero_point) + codes
    idx = w.outlier_idx.long()
    update.view(-1)[idx] = w.zero_point.expand(w.shape).reshape(-1)[idx]
    scale, zero = w.scale.clone(), w.zero_point.clone()
    for r in range(w.shape[0]):  # rows whose updated codes leave [0, 255] get the narrowest integer-zero grid
        lo, hi, s, z = (
            min(0.0, update[r].min().item()),
            max(255.0, update[r].max().item()),
            scale[r, 0].item(),
            zero[r, 0].item(),
        )
        if lo == 0.0 and hi == 255.0:
            continue
        options = []
        for z_new in range(256):
            need = [(z - lo) / z_new if z_new else (0.0 if z == lo else math.inf)]
            need.append((hi - z) / (255 - z_new) if z_new < 255 else (0.0 if hi == z else math.inf))
            options.append((max(need) * s, z_new))
        s_new, z_new = min(options)
        update[r] = (update[r] - z) * (s / s_new) + z_new
        scale[r, 0], zero[r, 0] = s_new, z_new
    key = key_tensor(counter_key(seed, stream, step), w.device)
    noise = counter_uniform(key, torch.tensor(0, dtype=torch.int32), *w.shape)
    new_codes = torch.floor(update + noise).clamp(0, 255)
    vals = w.outlier_val * (1 - lr * wd) - lr * d.view(-1)[idx]
    return new_codes.to(torch.uint8), vals, *quantize_blockwise(m, 16), scale, zero


@pytest.mark.parametrize("int8", [True, False])
def test_intlion_update_matches_dense_reference(chunk, int8):
    weight = _weight(int8=int8)
    lr, wd, betas = 0.02, 0.1, (0.9, 0.99)
    optimizer = IntLion([weight], lr=lr, weight_decay=wd, betas=betas, block_size=16, seed=5)
    m_codes = m_absmax = None
    for step in range(1, 4):
        weight.grad = None
        qft_linear(torch.randn(4, 29), weight).sin().sum().backward()
        grad = weight.grad.dequantize(torch.float32) if int8 else weight.grad.float()
        expected = _reference_lion(weight, grad, m_codes, m_absmax, lr, wd, betas, 5, 0, step)
        optimizer.step()
        state = optimizer.state[weight]
        assert torch.allclose(weight.scale, expected[4], rtol=1e-5) and torch.equal(weight.zero_point, expected[5])
        diff = (weight.codes.int() - expected[0].int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 2e-3  # float32 vs float64 grid re-fit arithmetic
        assert torch.equal(weight.outlier_val, expected[1])
        assert torch.equal(state["momentum"], expected[2]) and torch.equal(state["momentum_absmax"], expected[3])
        m_codes, m_absmax = state["momentum"], state["momentum_absmax"]
        weight.codes.copy_(expected[0])  # continue from the reference's state: the next step compares exactly again


def test_float_params_update_matches_dense_reference(chunk):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(41, 3))
    ref = p.detach().clone()
    optimizer = IntLion([p], lr=0.01, weight_decay=0.1, block_size=16)
    m = torch.zeros_like(ref)
    for _ in range(3):
        p.grad = torch.randn_like(ref)
        d = torch.sign(0.9 * m + 0.1 * p.grad)
        m = dequantize_blockwise(*quantize_blockwise(0.99 * m + 0.01 * p.grad, 16), ref.shape)
        ref = ref * (1 - 0.01 * 0.1) - 0.01 * d
        optimizer.step()
        assert torch.allclose(p.detach(), ref, atol=1e-7)


@pytest.mark.parametrize("int8", [True, False])
def test_compiled_dequantize_and_gradient_quantizer_equal_eager(monkeypatch, int8):
    """The forward/backward's compiled passes (float32 chunks: dequantize; int8 gradient rows: quantize) give the
    eager ops' bits: outputs, input gradient and weight gradient of a linear, a row of negligible gradient included."""
    from peqa_peft.core import kernels

    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 300)  # several chunks of different shapes
    monkeypatch.setattr(kernels, "COMPILE_MIN_WEIGHTS", 1)  # small enough to compile in a test
    monkeypatch.setattr(kernels, "_mode", "compiled")
    monkeypatch.setattr(kernels, "_compiled", {})

    def run(mode: str):
        weight = _weight(int8=int8)
        x = torch.randn(3, 5, 29, generator=torch.Generator().manual_seed(1), requires_grad=True)
        upstream = torch.randn(3, 5, 37, generator=torch.Generator().manual_seed(2))
        upstream[..., 4] *= 1e-33  # weight-gradient row 4 falls below GRAD_ROW_FLOOR
        with kernels.kernels(mode), warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a failed compile (silent eager fallback) fails the test
            y = qft_linear(x, weight)
            y.backward(upstream)
        grad = weight.grad
        return [y, x.grad] + ([grad.codes, grad.scale] if int8 else [grad])

    eager = run("eager")
    compiled = run("compiled")
    assert {"qft_dequant_rows"} | ({"qft_grad_rows"} if int8 else set()) <= set(kernels._compiled)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
    if int8:
        assert not eager[2][4].any()  # the negligible row is stored as zero


def test_kernels_inline_into_a_users_torch_compile(monkeypatch):
    """Under the caller's own torch.compile, the compiled passes are traced into its graph instead of being compiled
    on their own (which fails on fake tensors and would drop the process to eager kernels, with a warning)."""
    from peft import get_peft_model

    from peqa_peft import QftConfig
    from peqa_peft.core import kernels

    monkeypatch.setattr(kernels, "COMPILE_MIN_WEIGHTS", 1)
    monkeypatch.setattr(kernels, "_mode", "compiled")
    monkeypatch.setattr(kernels, "_compiled", {})
    torch.manual_seed(0)
    model = get_peft_model(
        nn.Sequential(nn.Linear(29, 37), nn.ReLU(), nn.Linear(37, 11)), QftConfig(target_modules=["0", "2"])
    )
    x = torch.randn(2, 3, 29, generator=torch.Generator().manual_seed(1))

    def run(fn):
        model.zero_grad(set_to_none=True)
        y = fn(x)
        y.square().sum().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        return [y.detach()] + [g.codes if isinstance(g, Int8Grad) else g for g in grads]

    eager = run(model.base_model.model)
    with warnings.catch_warnings(record=True) as caught:  # recorded, not raised: Dynamo would catch an error
        warnings.simplefilter("always")
        traced = run(torch.compile(model.base_model.model, backend="aot_eager"))
    assert not [str(w.message) for w in caught if "peqa_peft" in str(w.message)]
    assert kernels.kernel_mode() == "compiled"
    for a, b in zip(eager, traced):
        assert torch.equal(a, b)
