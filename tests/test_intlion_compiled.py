"""IntLion's compiled integer update against its eager reference, bit for bit, and the counter-based noise.

The compiled path (``IntLion(kernel="compiled")``: one torch.compile'd function per row chunk) and the eager path
(the same function op by op) must give identical codes, grids, outliers and momentum, so that switching paths (or
``kernel="auto"`` picking by weight size) never changes a run, and a resumed run stays bit-identical.
"""

import pytest
import torch
from torch import nn

from peqa_peft import IntLion
from peqa_peft.core import chunks
from peqa_peft.core.stochastic import counter_key, counter_uniform, key_tensor, stochastic_round
from peqa_peft.optim import integer_update
from peqa_peft.optim.blockwise import compand
from peqa_peft.tuners.qft import Int8Grad, QftWeight


def _row0(r: int) -> torch.Tensor:
    return torch.tensor(r, dtype=torch.int32)


def test_noise_depends_only_on_key_row_and_column():
    key = key_tensor(counter_key(3, 1, 5), "cpu")
    whole = counter_uniform(key, _row0(0), 40, 300)
    assert torch.equal(counter_uniform(key, _row0(17), 9, 300), whole[17:26])  # any row range: the same numbers
    for other in (counter_key(4, 1, 5), counter_key(3, 2, 5), counter_key(3, 1, 6), counter_key(3, 1, 5, shard=1)):
        assert (counter_uniform(key_tensor(other, "cpu"), _row0(0), 40, 300) != whole).float().mean() > 0.99


def test_noise_is_uniform_and_uncorrelated():
    u = counter_uniform(key_tensor(counter_key(0, 0, 1), "cpu"), _row0(0), 1000, 1000)
    assert u.min() >= 0 and u.max() < 1 and torch.equal(u, (u * 2**24).round() / 2**24)  # 24-bit multiples
    assert abs(u.mean().item() - 0.5) < 2e-3 and abs(u.var().item() - 1 / 12) < 2e-3
    hist = torch.histc(u, bins=64, min=0, max=1) / u.numel() * 64
    assert (hist - 1).abs().max() < 0.03
    for a, b in ((u[:, 1:], u[:, :-1]), (u[1:], u[:-1])):  # neighbouring columns / rows
        assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()) < 0.01


def test_stochastic_round_is_unbiased():
    x = torch.full((200, 500), 2.3)
    r = stochastic_round(x, key_tensor(counter_key(1, 0, 1), "cpu"), _row0(0))
    assert set(r.unique().tolist()) == {2.0, 3.0} and r.mean().item() == pytest.approx(2.3, abs=3e-3)


def test_companded_codes_are_exactly_the_nearest_root():
    """|c| is the integer nearest to sqrt(t), t = fl(|x| * 127^2), checked with exact comparisons (no sqrt)."""
    x = torch.cat([torch.linspace(-1, 1, 400001), torch.tensor([0.507796585559845])])  # eager sqrt is 1 ulp off there
    c = compand(x)
    t, a = x.abs() * 16129.0, c.float().abs()
    assert ((a - 0.5) * (a - 0.5) <= t)[a > 0].all() and (t < (a + 0.5) * (a + 0.5)).all()
    assert torch.equal(torch.sign(c.float()), torch.sign(x) * (a > 0))


def _weight(rows: int, cols: int, dtype: torch.dtype, int8: bool) -> nn.Parameter:
    torch.manual_seed(rows * cols)
    w = torch.randn(rows, cols)
    w[0] = w[0].abs() + 0.1  # an all-positive row: zero point 0, so its updates overflow the grid (re-fit path)
    return nn.Parameter(QftWeight.from_float(w.to(dtype), 0.03, int8_grad=int8))


def _train(kernel: str, rows: int, cols: int, dtype, int8: bool, block: int, quantize_momentum: bool):
    w = _weight(rows, cols, dtype, int8)
    lr = 0.4 * w.scale.mean().item()
    optimizer = IntLion([w], lr=lr, weight_decay=0.1, block_size=block, quantize_momentum=quantize_momentum,
                        seed=11, kernel=kernel)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        g = torch.randn(rows, cols, generator=gen) * torch.logspace(-4, 0, cols)
        g[0] = g[0].abs()  # keeps pushing the all-positive row down, past code 0
        w.grad = Int8Grad.from_float(g, dtype) if int8 else g.to(dtype)
        optimizer.step()
    state = optimizer.state[w]
    return [*w.state_tensors().values(), state["momentum"], state.get("momentum_absmax", torch.zeros(1))]


@pytest.mark.parametrize(
    "rows, cols, dtype, int8, block, quantize_momentum",
    [
        (40, 512, torch.float32, True, 256, True),  # momentum blocks tile the rows: the (rows, blocks, block) layout
        (37, 29, torch.bfloat16, False, 16, True),  # blocks straddle rows, a partial last block, bf16 float grads
        (23, 48, torch.float32, True, 16, False),  # float32 momentum
    ],
)
def test_compiled_update_is_bit_identical_to_eager(monkeypatch, rows, cols, dtype, int8, block, quantize_momentum):
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 600)  # several chunks of different shapes per weight
    eager = _train("eager", rows, cols, dtype, int8, block, quantize_momentum)
    torch._dynamo.utils.counters.clear()
    compiled = _train("compiled", rows, cols, dtype, int8, block, quantize_momentum)
    assert torch._dynamo.utils.counters["stats"]["calls_captured"] > 0  # really compiled, not a silent fallback
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
    w0 = _weight(rows, cols, dtype, int8)
    assert not torch.equal(eager[0], w0.codes) and not torch.equal(eager[1], w0.scale)  # codes moved, a row re-fit


def test_auto_compiles_only_large_weights(monkeypatch):
    assert integer_update.update_kernel("auto", 1 << 10) == "eager"
    assert integer_update.update_kernel("auto", 1 << 20) == "compiled"
    assert integer_update.update_kernel("eager", 1 << 20) == "eager"
    monkeypatch.setattr("peqa_peft.core.kernels._mode", "eager")  # PEQA_KERNELS=eager: nothing compiles
    assert integer_update.update_kernel("auto", 1 << 20) == "eager"


def test_bad_kernel_option():
    with pytest.raises(ValueError, match="kernel"):
        IntLion([nn.Parameter(torch.zeros(3))], kernel="fast")


def test_a_failed_compile_falls_back_to_eager_only_under_auto(monkeypatch):
    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr("peqa_peft.core.kernels._mode", "compiled")  # restored afterwards (the fallback changes it)
    monkeypatch.setattr(integer_update, "_compiled", lambda: broken)
    results = []
    for kernel in ("eager", "auto"):
        w = _weight(512, 512, torch.float32, True)
        w.grad = Int8Grad.from_float(torch.randn(512, 512, generator=torch.Generator().manual_seed(0)))
        optimizer = IntLion([w], lr=1e-3, kernel=kernel)
        if kernel == "auto":
            with pytest.warns(RuntimeWarning, match="torch.compile of IntLion's update failed"):
                optimizer.step()
        else:
            optimizer.step()
        results.append(w.codes.clone())
    assert torch.equal(*results)
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        IntLion([w], lr=1e-3, kernel="compiled").step()
