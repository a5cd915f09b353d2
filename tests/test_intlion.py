"""IntLion: float-Lion reference, integer invariants, exact resume, clipping, fused mode and Trainer factory."""

import copy
import gc
import io

import pytest
import torch
from conftest import tiny_llama
from lion_pytorch import Lion
from peft import get_peft_model
from torch import nn

import peqa_peft
from peqa_peft import IntLion, QftConfig
from peqa_peft.optim import dequantize_blockwise, quantize_blockwise
from peqa_peft.tuners.qft import Int8Grad, QftWeight


def _float_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))


def _run_steps(model, optimizer, batch_loss, steps: int, seed: int, clip: float) -> list[float]:
    """``steps`` optimizer steps on seeded batches; ``batch_loss(model, generator)`` returns a batch's loss."""
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        loss = batch_loss(model, gen)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _train(model, optimizer, steps: int, seed: int = 1, clip: float = 0.0) -> list[float]:
    """Steps of the float toy regression."""
    return _run_steps(
        model, optimizer, lambda m, g: m(torch.randn(8, 16, generator=g)).square().mean(), steps, seed, clip
    )


@pytest.mark.parametrize(
    "bad", [{"lr": 0.0}, {"lr": -1e-3}, {"betas": (0.9, 1.5)}, {"weight_decay": -0.1}, {"block_size": 0}]
)
def test_bad_hyperparameters(bad):
    with pytest.raises(ValueError):
        IntLion(_float_model().parameters(), **bad)


def test_matches_float_lion_without_momentum_quantization():
    ours, ref = _float_model(), _float_model()
    opt = IntLion(ours.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, quantize_momentum=False)
    ref_opt = Lion(ref.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    assert _train(ours, opt, 20) == pytest.approx(_train(ref, ref_opt, 20), rel=1e-6)
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_int8_momentum_stays_close_to_float_lion():
    ours, ref = _float_model(), _float_model()
    opt = IntLion(ours.parameters(), lr=1e-3, quantize_momentum=True)
    _train(ours, opt, 20)
    _train(ref, Lion(ref.parameters(), lr=1e-3), 20)
    moved = sum((q - p0).abs().sum() for q, p0 in zip(ref.parameters(), _float_model().parameters()))
    diff = sum((p - q).abs().sum() for p, q in zip(ours.parameters(), ref.parameters()))
    assert diff < 0.1 * moved  # sign updates agree on the vast majority of entries
    state = opt.state[next(iter(ours.parameters()))]
    assert state["momentum"].dtype == torch.int8 and state["momentum_absmax"].dtype == torch.float32


def test_blockwise_momentum_roundtrip():
    x = torch.randn(1000) * torch.logspace(-3, 0, 1000)
    codes, absmax = quantize_blockwise(x, 256)
    assert codes.dtype == torch.int8 and codes.shape == (4, 256) and absmax.shape == (4,)
    back = dequantize_blockwise(codes, absmax, x.shape)
    blockmax = absmax.repeat_interleave(256)[:1000]
    assert ((back - x).abs() <= 2 * (x.abs() * blockmax).sqrt() / 127 + 1e-7).all()


def _qft(seed: int = 0, **config):
    model = get_peft_model(tiny_llama(seed), QftConfig(target_modules="all-linear", **config))
    return model


def _lm_loss(model, gen: torch.Generator) -> torch.Tensor:
    ids = torch.randint(0, 128, (2, 12), generator=gen)
    return model(input_ids=ids, labels=ids).loss


def _qft_steps(model, optimizer, steps: int, clip: float = 0.0, seed: int = 3) -> list[float]:
    """Steps of language modelling on random token batches."""
    return _run_steps(model, optimizer, _lm_loss, steps, seed, clip)


def _weights(model) -> list[QftWeight]:
    return [p for p in model.parameters() if isinstance(p, QftWeight)]


def test_integer_weights_stay_integer_and_in_range():
    model = _qft(outlier_refresh_steps=2)
    before = [w.dequantize().clone() for w in _weights(model)]
    optimizer = IntLion(model.parameters(), lr=5e-3, weight_decay=0.1)
    _qft_steps(model, optimizer, 4)
    changed = 0
    for w, w0 in zip(_weights(model), before):
        assert w.codes.dtype == torch.uint8 and w.codes.min() >= 0 and w.codes.max() <= 255
        # outlier positions hold the zero-point code (they live in float only)
        zero_codes = w.zero_point.expand_as(w.codes).reshape(-1)[w.outlier_idx.long()]
        assert torch.equal(w.codes.reshape(-1)[w.outlier_idx.long()].float(), zero_codes)
        # every dense entry is still exactly on its row's int8 grid
        dense = w.dequantize().reshape(-1).clone()
        dense[w.outlier_idx.long()] = 0
        steps = dense.view_as(w) / w.scale + w.zero_point
        assert torch.allclose(steps, steps.round(), atol=1e-3)
        changed += int((w.dequantize() != w0).sum())
    assert changed > 0
    assert all(p.grad is None for p in model.parameters())


def test_lr_below_one_step_moves_weights_by_lr_on_average():
    torch.manual_seed(0)
    w = nn.Parameter(QftWeight.from_float(torch.randn(64, 256), outlier_fraction=0.0))
    step = w.scale.mean().item()
    optimizer = IntLion([w], lr=0.25 * step)
    before = w.dequantize().clone()
    w.grad = torch.ones(64, 256)  # sign = +1 everywhere: every entry should move by -lr
    optimizer.step()
    moved = (before - w.dequantize()).mean().item()
    assert moved == pytest.approx(0.25 * step, rel=0.1)


@pytest.mark.parametrize("push", [1.0, -1.0])
def test_edge_codes_get_their_update(push):
    """The sub-step experiment: codes at 0/255 pushed outward must move by lr on average, like every other code."""
    torch.manual_seed(0)
    w = nn.Parameter(QftWeight.from_float(torch.randn(64, 256), outlier_fraction=0.01))
    lr = 0.25 * w.scale.mean().item()
    optimizer = IntLion([w], lr=lr)
    edge = (w.codes == (255 if push > 0 else 0)).view(-1)
    edge[w.outlier_idx.long()] = False
    assert edge.sum() >= 64  # min-max grids put codes at both edges of every row
    start = w.dequantize().clone()
    steps = 8
    for _ in range(steps):
        w.grad = torch.full((64, 256), -push)  # direction -push: every weight moves by +push * lr per step
        optimizer.step()
    moved = ((w.dequantize() - start) * push).view(-1)
    assert moved[edge].mean() >= 0.95 * steps * lr
    assert moved.mean() == pytest.approx(steps * lr, rel=0.05)
    # the widened grids still hold every dense entry exactly, with integer zero-points
    assert torch.equal(w.zero_point, w.zero_point.round())
    dense = w.dequantize().view(-1).clone()
    dense[w.outlier_idx.long()] = 0
    grid = dense.view(64, 256) / w.scale + w.zero_point
    assert torch.allclose(grid, grid.round(), atol=1e-3)


def _resume_run(dtype: torch.dtype, stock_load: bool = False, kernel: str = "auto"):
    """Train 3 steps, checkpoint, train 3 more; resume a fresh model from the checkpoint and train the same 3."""
    model = _qft(outlier_refresh_steps=2, modules_to_save=["lm_head"]).to(dtype)
    optimizer = IntLion(model.parameters(), lr=2e-3, seed=7, kernel=kernel)
    _qft_steps(model, optimizer, 3)
    saved_model = copy.deepcopy({k: v.clone() for k, v in model.state_dict().items()})
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    expected = _qft_steps(model, optimizer, 3, seed=9)
    expected_params = [
        p.detach().clone() for p in model.parameters() if p.requires_grad and not isinstance(p, QftWeight)
    ]

    fresh = _qft(seed=1, outlier_refresh_steps=2, modules_to_save=["lm_head"]).to(dtype)  # overwritten below
    fresh.load_state_dict(saved_model)
    fresh_opt = IntLion(fresh.parameters(), lr=2e-3, seed=0, kernel=kernel)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    (torch.optim.Optimizer.load_state_dict if stock_load else IntLion.load_state_dict)(fresh_opt, state)
    got = _qft_steps(fresh, fresh_opt, 3, seed=9)
    same_codes = all(torch.equal(a.codes, b.codes) for a, b in zip(_weights(fresh), _weights(model)))
    params = [p.detach() for p in fresh.parameters() if p.requires_grad and not isinstance(p, QftWeight)]
    same_params = all(torch.equal(a, b) for a, b in zip(params, expected_params))
    return got == expected and same_codes and same_params


@pytest.mark.parametrize("kernel", ["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_from_state_dict_is_bit_identical(dtype, kernel):
    assert _resume_run(dtype, kernel=kernel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_and_eager_updates_train_the_same_model(dtype):
    runs = []
    for kernel in ("eager", "compiled"):
        model = _qft(outlier_refresh_steps=2).to(dtype)
        losses = _qft_steps(model, IntLion(model.parameters(), lr=2e-3, weight_decay=0.1, kernel=kernel), 3)
        runs.append((losses, [w.state_tensors() for w in _weights(model)]))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1]):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_stock_load_state_dict_breaks_bf16_resume():
    """Guard of the test above: torch's own load_state_dict casts the float32 momentum scales to bf16."""
    assert not _resume_run(torch.bfloat16, stock_load=True)


def _grad_norm(params) -> float:
    """The total L2 norm of the gradients, from scratch in float64 (int8 gradients dequantized)."""
    total = 0.0
    for p in params:
        g = p.grad.dequantize(torch.float64) if isinstance(p.grad, Int8Grad) else p.grad.double()
        total += g.square().sum().item()
    return total**0.5


@pytest.mark.parametrize("int8", [True, False])
def test_clipping_is_exact(int8):
    """After clip_grad_norm_, the gradients' total norm is max_norm (int8 gradients: only the row scales change)."""
    model = _qft(modules_to_save=["lm_head"], int8_gradients=int8)
    _lm_loss(model, torch.Generator().manual_seed(0)).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    assert any(isinstance(p, QftWeight) for p in params) and any(not isinstance(p, QftWeight) for p in params)
    norm = _grad_norm(params)
    codes = [p.grad.codes.clone() for p in params if isinstance(p.grad, Int8Grad)]
    returned = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=norm / 10)
    assert returned.item() == pytest.approx(norm, rel=1e-5)
    assert _grad_norm(params) == pytest.approx(norm / 10, rel=1e-5)
    assert all(
        torch.equal(a, p.grad.codes) for a, p in zip(codes, [p for p in params if isinstance(p.grad, Int8Grad)])
    )


def test_clipping_changes_the_update_when_the_norm_exceeds_the_limit():
    def run(clip):
        model = _qft()
        optimizer = IntLion(model.parameters(), lr=2e-3)
        _qft_steps(model, optimizer, 1)  # build up momentum: Lion's first step is sign(g), scale-invariant
        _qft_steps(model, optimizer, 1, clip=clip, seed=5)
        return [w.codes.clone() for w in _weights(model)]

    unclipped, huge_limit, clipped = run(0.0), run(1e9), run(1e-3)
    assert all(torch.equal(a, b) for a, b in zip(unclipped, huge_limit))
    assert any(not torch.equal(a, b) for a, b in zip(unclipped, clipped))


@pytest.mark.parametrize("fused", [False, True])
def test_no_float_copy_of_any_targeted_weight_after_training(fused):
    """Scan every live tensor (gc) for a float tensor shaped like a targeted weight: QFT keeps no master copy."""
    torch.manual_seed(0)
    # shapes chosen so that no other float tensor of the model (embeddings, head, norms) shares a linear's shape
    base = tiny_llama(hidden_size=48, intermediate_size=80, vocab_size=96, num_attention_heads=4)
    model = get_peft_model(base, QftConfig(target_modules="all-linear"))
    shapes = {tuple(w.shape) for w in _weights(model)}
    shapes |= {s[::-1] for s in shapes}
    optimizer = IntLion(model.parameters(), lr=2e-3, fused=fused)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        ids = torch.randint(0, 96, (2, 12), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    if not fused:
        model(input_ids=ids, labels=ids).loss.backward()  # gradients resident, as when Trainer clips them
    gc.collect()
    found = [
        tuple(obj.shape)
        for obj in gc.get_objects()
        if type(obj) in (torch.Tensor, nn.Parameter) and obj.is_floating_point() and tuple(obj.shape) in shapes
    ]
    assert not found, found
    assert all(isinstance(w.grad, Int8Grad) for w in _weights(model)) != fused


def test_fused_mode_matches_standard_and_holds_no_gradients():
    standard, fused = _qft(), _qft()
    _qft_steps(standard, IntLion(standard.parameters(), lr=2e-3), 3)
    fused_opt = IntLion(fused.parameters(), lr=2e-3, fused=True)
    _qft_steps(fused, fused_opt, 3)
    assert all(torch.equal(a.codes, b.codes) for a, b in zip(_weights(standard), _weights(fused)))
    assert all(p.grad is None for p in fused.parameters())


def test_trainer_factory_protocol():
    from transformers.trainer_optimizer import is_optimizer_factory

    factory, kwargs = IntLion.trainer_factory(lr=3e-4, betas=(0.9, 0.98), weight_decay=0.1, seed=3)
    assert is_optimizer_factory(factory)
    model = _qft(modules_to_save=["lm_head"])
    optimizer = factory()(model, **kwargs)
    assert isinstance(optimizer, IntLion)
    groups = {g["weight_decay"]: g for g in optimizer.param_groups}
    assert all(p.dim() >= 2 for p in groups[0.1]["params"]) and groups[0.1]["seed"] == 3
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError):
        IntLion.trainer_factory(lr=-1.0)


# ---------------------------------------------------------------- non-finite gradients (issue 11 item 1)


def _nan_guard_model(kind: str):
    if kind == "qft":
        return _qft(full_parameter=False)  # the poisoning below writes into the float input embeddings
    from peqa_peft import PeqaConfig

    return get_peft_model(tiny_llama(), PeqaConfig(bits=4, target_modules="all-linear"))  # Δs: float params


def _poisoned_step(model, optimizer, value: float) -> None:
    """One step whose loss is non-finite: one input embedding row is ``value`` during forward/backward."""
    emb = model.get_input_embeddings().weight
    saved = emb.data[5].clone()
    emb.data[5] = value
    ids = torch.full((2, 12), 5, dtype=torch.long)
    model(input_ids=ids, labels=ids).loss.backward()
    emb.data[5] = saved
    optimizer.step()
    optimizer.zero_grad()


def _trainable_snapshot(model) -> list[torch.Tensor]:
    return [
        (p.codes.clone() if isinstance(p, QftWeight) else p.detach().clone())
        for p in model.parameters()
        if p.requires_grad
    ]


@pytest.mark.parametrize("kind", ["qft", "peqa"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_step_is_skipped_and_training_goes_on(kind, value):
    """Issue 11's repro: after one NaN step every trainable tensor must still move, exactly as if it never happened."""
    model, control = _nan_guard_model(kind), _nan_guard_model(kind)
    optimizer, control_opt = IntLion(model.parameters(), lr=2e-3), IntLion(control.parameters(), lr=2e-3)
    _qft_steps(model, optimizer, 1, seed=1)
    _qft_steps(control, control_opt, 1, seed=1)
    before = _trainable_snapshot(model)
    states = copy.deepcopy(optimizer.state_dict()["state"])
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        _poisoned_step(model, optimizer, value)
    assert all(torch.equal(a, b) for a, b in zip(_trainable_snapshot(model), before))
    assert optimizer.skipped_steps == len(optimizer.state) > 0
    for i, state in optimizer.state_dict()["state"].items():
        assert state["skipped_steps"] == 1 and state["consecutive_skips"] == 1
        assert all(torch.equal(state[k], v) for k, v in states[i].items() if isinstance(v, torch.Tensor))
        assert state["step"] == states[i]["step"]
    losses = _qft_steps(model, optimizer, 3, seed=2)
    assert losses == _qft_steps(control, control_opt, 3, seed=2)  # bit-identical to the run without the bad step
    after = _trainable_snapshot(model)
    assert all(not torch.equal(a, b) for a, b in zip(after, before))  # every trainable tensor moved
    assert all(torch.equal(a, b) for a, b in zip(after, _trainable_snapshot(control)))
    for state in optimizer.state.values():
        assert state["consecutive_skips"] == 0
        assert all(torch.isfinite(v.float()).all() for v in state.values() if isinstance(v, torch.Tensor))


def test_skip_of_one_param_leaves_the_others_updating():
    model = _float_model()
    optimizer = IntLion(model.parameters(), lr=1e-3)
    model(torch.randn(4, 16)).sum().backward()
    first = next(model.parameters())
    first.grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match=r"\(1 of 4\)"):
        optimizer.step()
    moved = [not torch.equal(p, b) for p, b in zip(model.parameters(), before)]
    assert moved == [False, True, True, True]
    assert "momentum" not in optimizer.state[first]


@pytest.mark.parametrize("fused", [False, True])
def test_consecutive_non_finite_steps_raise(fused):
    model = _qft(full_parameter=False)  # the poisoning writes into the float input embeddings
    optimizer = IntLion(model.parameters(), lr=2e-3, max_consecutive_skips=2, fused=fused)
    with pytest.warns(RuntimeWarning):
        _poisoned_step(model, optimizer, float("nan"))
    _qft_steps(model, optimizer, 1)  # a clean step resets the count
    with pytest.warns(RuntimeWarning):
        _poisoned_step(model, optimizer, float("nan"))
    with pytest.raises(peqa_peft.optim.NonFiniteGradientError, match="2 consecutive steps"):
        _poisoned_step(model, optimizer, float("nan"))


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_max_consecutive_skips(bad):
    with pytest.raises(ValueError, match="max_consecutive_skips"):
        IntLion(_float_model().parameters(), max_consecutive_skips=bad)
