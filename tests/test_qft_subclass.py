"""QftWeight / Int8Grad as tensor subclasses: flatten protocol, no silent densifying, torch.compile, DCP."""

import warnings

import pytest
import torch
from conftest import tiny_llama
from peft import get_peft_model
from torch import nn

from peqa_peft import QftConfig
from peqa_peft.tuners.qft import Int8Grad, QftWeight, allow_dense_fallback


def _weight() -> QftWeight:
    torch.manual_seed(0)
    return QftWeight.from_float(torch.randn(12, 20), 0.05, refresh_every=7)


def test_flatten_unflatten_round_trip():
    w = _weight()
    names, meta = w.__tensor_flatten__()
    back = QftWeight.__tensor_unflatten__({n: getattr(w, n) for n in names}, meta, w.shape, w.stride())
    assert torch.equal(back.dequantize(), w.dequantize()) and back.dtype == w.dtype and back.refresh_every == 7
    g = Int8Grad.from_float(torch.randn(12, 20))
    names, meta = g.__tensor_flatten__()
    back = Int8Grad.__tensor_unflatten__({n: getattr(g, n) for n in names}, meta, g.shape, g.stride())
    assert torch.equal(back.dequantize(), g.dequantize())


def test_unsupported_ops_raise_unless_opted_in():
    w = _weight()
    x = torch.randn(3, 20)
    with pytest.raises(NotImplementedError, match="no handler for aten"):
        torch.nn.functional.linear(x, w)  # would silently densify the weight
    with pytest.raises(NotImplementedError, match="no handler"):
        Int8Grad.from_float(torch.randn(4, 5)).sum()
    with pytest.raises(NotImplementedError, match="in-place"):
        w.add_(1.0)
    with allow_dense_fallback(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1 = torch.nn.functional.linear(x, w)
        y2 = torch.nn.functional.linear(x, w)
    assert torch.allclose(y1, x @ w.dequantize().t(), atol=1e-6) and torch.equal(y1, y2)
    assert sum("dense copy" in str(c.message) for c in caught) == 1  # warned once per op
    with pytest.raises(NotImplementedError):
        torch.nn.functional.linear(x, w)  # the opt-in ends with the block


def _loss_and_grads(model, forward, ids):
    loss = forward(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [
        (p.grad.dequantize().clone(), p.grad.scale.clone()) for p in model.parameters() if isinstance(p, QftWeight)
    ]
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.slow
def test_torch_compile_forward_backward_matches_eager():
    model = get_peft_model(tiny_llama(), QftConfig(target_modules="all-linear"))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    loss, grads = _loss_and_grads(model, model, ids)
    compiled = torch.compile(model.base_model.model, backend="aot_eager")
    c_loss, c_grads = _loss_and_grads(model, compiled, ids)
    assert torch.allclose(loss, c_loss, atol=1e-5)
    assert len(grads) == 16
    for (a, scale), (b, _) in zip(grads, c_grads):
        # The same gradient summed in another order may round to the neighbouring int8 code: at most one step.
        assert ((a - b).abs() <= scale * 1.001 + 1e-7).all()
        assert ((a - b).abs() > 1e-5).float().mean() < 1e-3  # and only rarely


def test_distributed_checkpoint_round_trip(tmp_path):
    import torch.distributed.checkpoint as dcp

    from peqa_peft import IntLion

    model = get_peft_model(tiny_llama(), QftConfig(target_modules="all-linear"))
    optimizer = IntLion(model.parameters(), lr=5e-3)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()  # the saved weights differ from a fresh quantization
    dcp.save(model.state_dict(), checkpoint_id=str(tmp_path / "dcp"))
    fresh = get_peft_model(tiny_llama(seed=1), QftConfig(target_modules="all-linear"))
    state = fresh.state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path / "dcp"))
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
    pairs = zip(
        [p for p in fresh.parameters() if isinstance(p, QftWeight)],
        [p for p in model.parameters() if isinstance(p, QftWeight)],
    )
    assert all(torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) for a, b in pairs)


def test_parameter_wrapping_keeps_the_subclass():
    w = nn.Parameter(_weight())
    assert isinstance(w, QftWeight) and w.requires_grad
