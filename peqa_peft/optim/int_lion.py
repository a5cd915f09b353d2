"""IntLion: the Lion optimizer applied to integer (QFT) weights, with int8 momentum.

Design: the optimizer's params *are* the quantized weights
-----------------------------------------------------------
A QFT weight is a :class:`~peqa_peft.core.qft.tensor.QftWeight`, a wrapper tensor subclass (as in torchao's int8
quantized training) that looks like a float ``(out, in)`` tensor but stores only uint8 codes, per-channel scales
and a few float outliers. It is a real ``nn.Parameter``, so the things Trainer does with parameters work unchanged:
``model.parameters()`` hands it to this optimizer, ``print_trainable_parameters`` counts ``out * in``, autograd
gives it a ``.grad`` (float, or an ``Int8Grad`` subclass when the config keeps gradients in int8),
``clip_grad_norm_`` computes the real norm of those gradients and scales them in place, and gradient accumulation
adds into them. We chose this over dummy float placeholders (one per layer, with the integers kept aside and the
gradient routed to the placeholder) because placeholders either cost a float tensor per weight -- defeating the
memory goal -- or have the wrong shape, making Trainer's grad norm, clipping and parameter counts wrong.

The update
----------
For every param with a gradient ``g`` (float32 math, :func:`lion_direction_`)::

    c = beta1 * m + (1 - beta1) * g ;  d = sign(c) ;  m <- beta2 * m + (1 - beta2) * g

- float params: ``p <- p * (1 - lr * wd) - lr * d`` (plain Lion with decoupled weight decay);
- integer weights (any param following the protocol of :mod:`.integer_update`, e.g. QFT's ``QftWeight``): ``W <- W -
  lr * (d + wd * W)`` by :func:`.integer_update.lion_update_rows_` (codes move by ``-(lr / s) * d - lr * wd * (q -
  z)`` steps, stochastically rounded, rows re-fitted instead of clamped at the grid's edges, outliers in float),
  and, if it has ``refresh_every``, :func:`.integer_update.reselect_outliers_` every that many steps. The optimizer
  does not import the weight type, and the weight does not know the optimizer. A gradient with
  ``dequantize_rows``/``is_finite`` (QFT's ``Int8Grad``) is read row range by row range.

Weight-sized work runs over row chunks of about ``peqa_peft.core.chunks.CHUNK_ELEMENTS`` entries, so every
temporary stays in cache and none is weight-sized; results do not depend on the chunk size. An integer weight's
whole update of a chunk (gradient and momentum dequantization, direction, momentum, code update, grid re-fit,
stochastic rounding, requantization of codes and momentum) is one function, run through ``torch.compile`` or
op by op (``kernel=``; bit-identical either way).

The rounding noise of entry ``(r, c)`` of weight ``i`` at step ``t`` is a hash of ``(seed, i, t, r, c)``
(:mod:`peqa_peft.core.stochastic`), so it is reproducible and a resumed run draws the same numbers as an
uninterrupted one without saving generator state.
Under FSDP2 the params are ``DTensor`` shards: each rank updates its own piece (its rows of an integer weight, its
part of a float param), keeps momentum for that piece only, and seeds its noise with the shard index as well.

The momentum ``m`` is stored as int8 in blocks of ``block_size`` with one float32 absmax each
(``quantize_momentum=True``) or in float32. The state is tensors and ints only, so ``torch.save`` /
``torch.load(weights_only=True)`` (Trainer's ``optimizer.pt``) round-trip it exactly.

Fused mode
----------
``fused=True`` applies each param's update in a post-accumulate-grad hook as soon as backward has produced its
gradient and then frees the gradient, so at most one gradient is resident. The update then happens before the
global gradient norm is known and on every backward: use it without gradient clipping and without gradient
accumulation (``step()`` becomes a no-op for params the hooks already updated).

Non-finite gradients
--------------------
A NaN/inf gradient would poison the momentum for good (its block absmax becomes NaN). As AMP's ``GradScaler`` does,
the update of a param whose gradient is not finite is skipped: its momentum, step count and weight stay exactly as
they were (so the rounding noise of later steps is unchanged too). Each skip is counted in the param's state
(``skipped_steps``, ``consecutive_skips``) and announced by a ``RuntimeWarning``; after ``max_consecutive_skips``
skips in a row of the same param the optimizer raises instead, since training has then stopped making progress.
(With global gradient clipping one non-finite gradient makes the total norm, and so every clipped gradient, NaN:
then the whole step is skipped.)
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Optional, Union

import torch
from torch import nn

from ..core.chunks import row_chunks
from ..core.stochastic import counter_key
from . import integer_update
from .blockwise import dequantize_blocks, dequantize_blockwise, quantize_blocks, quantize_blockwise

try:  # FSDP2 hands the optimizer DTensor params; absent where torch has no distributed support
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover
    _DTensor = None

ParamsT = Union[Iterable[torch.Tensor], Iterable[dict[str, Any]]]


DEFAULT_MAX_CONSECUTIVE_SKIPS = 10
KERNELS = ("auto", "compiled", "eager")  # IntLion(kernel=...): how integer weights are updated (see the class)
_TINY = torch.finfo(torch.float32).tiny  # absmax of an all-zero momentum block (as quantize_blockwise stores it)


class NonFiniteGradientError(RuntimeError):
    """Raised when a param's gradient was non-finite ``max_consecutive_skips`` optimizer steps in a row."""


def _check_hparams(lr: float, betas: tuple[float, float], weight_decay: float, block_size: int, seed: int) -> None:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"`lr` must be a positive finite number, got {lr!r}")
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b <= 1.0 for b in betas):
        raise ValueError(f"`betas` must be two numbers in [0, 1], got {betas!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"`weight_decay` must be a number >= 0, got {weight_decay!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"`block_size` must be a positive int, got {block_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"`seed` must be an int, got {seed!r}")


def _check_max_skips(value: Optional[int]) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"`max_consecutive_skips` must be a positive int or None (never raise), got {value!r}")


def _grad_is_finite(grad: torch.Tensor) -> bool:
    """Whether every entry of ``grad`` is finite (an ``Int8Grad`` is finite iff its row scales are)."""
    if grad.is_sparse:
        raise RuntimeError("IntLion does not support sparse gradients")
    check = getattr(grad, "is_finite", None)  # an int8 gradient checks its row scales only
    return check() if callable(check) else bool(torch.isfinite(grad).all())


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of an FSDP2-sharded ``DTensor`` (the tensor itself otherwise): updates are rank-local."""
    return t._local_tensor if _DTensor is not None and isinstance(t, _DTensor) else t


def _shard_index(p: torch.Tensor) -> int:
    """Which piece of a sharded ``DTensor`` param this rank holds (0 for an ordinary param)."""
    if _DTensor is None or not isinstance(p, _DTensor):
        return 0
    index = 0
    for size, coordinate in zip(p.device_mesh.shape, p.device_mesh.get_coordinate()):
        index = index * size + coordinate
    return index


def _grad_rows(grad: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Rows ``r0:r1`` of a 2-D gradient as float32 (an int8 gradient dequantizes just those rows)."""
    if grad.is_sparse:
        raise RuntimeError("IntLion does not support sparse gradients")
    rows = getattr(grad, "dequantize_rows", None)
    return rows(r0, r1, torch.float32) if rows is not None else grad[r0:r1].float()


def lion_direction_(momentum: torch.Tensor, grad: torch.Tensor, beta1: float, beta2: float) -> torch.Tensor:
    """Lion's update direction ``sign(beta1 * m + (1 - beta1) * g)``; ``m`` becomes ``beta2 * m + (1 - beta2) * g``.

    The whole of Lion's arithmetic, on float32 tensors of equal shape (``momentum`` is updated in place).
    """
    direction = momentum.mul(beta1).add_(grad, alpha=1.0 - beta1).sign_()
    momentum.mul_(beta2).add_(grad, alpha=1.0 - beta2)
    return direction


class IntLion(torch.optim.Optimizer):
    """Lion for integer QFT weights and float params, with int8 blockwise momentum (see the module docstring).

    Args:
        params: parameters or param groups (``QftWeight`` params and/or ordinary float params).
        lr: Lion learning rate (absolute weight change per step; mapped to quantization steps for QFT weights).
        betas: ``(beta1, beta2)``: interpolation for the update direction and momentum decay.
        weight_decay: decoupled weight decay (``W <- W * (1 - lr * wd)``).
        quantize_momentum: store momentum as int8 blocks (``True``) or float32 (exact Lion, for testing).
        block_size: entries per momentum block (one float32 absmax each).
        seed: seed of the stochastic rounding; together with the step count it fixes all randomness.
        fused: update in post-accumulate-grad hooks during backward (no global clipping / accumulation).
        max_consecutive_skips: raise :class:`NonFiniteGradientError` once a param's gradient has been non-finite this
            many steps in a row (each such step is skipped for that param, see the module docstring); ``None``:
            never raise.
        kernel: how integer weights are updated: ``"compiled"``, one ``torch.compile``'d pass per row chunk
            (:func:`.integer_update.lion_momentum_update_`); ``"eager"``, the same function run op by op (the
            reference; bit-identical results, several times slower); ``"auto"`` (default): compiled for weights of at
            least ``peqa_peft.core.kernels.COMPILE_MIN_WEIGHTS`` entries while peqa_peft's kernel mode is
            ``"compiled"`` (the default; ``PEQA_KERNELS=eager`` switches it off), eager otherwise. The choice never
            changes the results, only the speed.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        quantize_momentum: bool = True,
        block_size: int = 256,
        seed: int = 0,
        fused: bool = False,
        max_consecutive_skips: Optional[int] = DEFAULT_MAX_CONSECUTIVE_SKIPS,
        kernel: str = "auto",
    ) -> None:
        _check_hparams(lr, tuple(betas), weight_decay, block_size, seed)
        _check_max_skips(max_consecutive_skips)
        if kernel not in KERNELS:
            raise ValueError(f"`kernel` must be one of {KERNELS}, got {kernel!r}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            weight_decay=weight_decay,
            quantize_momentum=bool(quantize_momentum),
            block_size=block_size,
            seed=seed,
        )
        super().__init__(params, defaults)
        self.fused = fused
        self.kernel = kernel
        self.max_consecutive_skips = max_consecutive_skips
        self._hooks: list = []
        if fused:
            self._register_fused_hooks()

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        **kwargs: Any,
    ) -> IntLion:
        """An optimizer over ``model``'s trainable params; weight decay only on matrices (not biases or norms)."""
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return cls([g for g in groups if g["params"]], lr=lr, betas=betas, weight_decay=weight_decay, **kwargs)

    @classmethod
    def trainer_factory(
        cls,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        **kwargs: Any,
    ) -> tuple[Callable, dict[str, Any]]:
        """``(factory, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)`` / TRL ``SFTTrainer``.

        Trainer calls ``factory()(model, **kwargs)`` for non-class factories; ours builds the optimizer with
        :meth:`from_model`, so these ``lr``/``betas``/``weight_decay`` are the ones used (Trainer's own
        ``args.weight_decay`` does not override them). Extra kwargs (``quantize_momentum``, ``seed``, ...) pass on.
        """
        _check_hparams(lr, tuple(betas), weight_decay, kwargs.get("block_size", 256), kwargs.get("seed", 0))
        if kwargs.get("fused"):
            raise ValueError("fused=True updates during backward; Trainer's clipping/accumulation need fused=False")
        return functools.partial(_TrainerFactory, cls), dict(
            lr=lr, betas=tuple(betas), weight_decay=weight_decay, **kwargs
        )

    def _positions(self) -> dict[int, tuple[int, int]]:
        """``id(param) -> (group index, global param index)``; the global index names the param's random stream."""
        positions, index = {}, 0
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                positions[id(p)] = (gi, index)
                index += 1
        return positions

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """One Lion update of every param that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        positions = self._positions()
        skipped, total = [], 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    total += 1
                    if not self._update(p, group, positions[id(p)][1]):
                        skipped.append(positions[id(p)][1])
        if skipped:
            self._report_skips(skipped, total)
        return loss

    @property
    def skipped_steps(self) -> int:
        """How many param updates were skipped for non-finite gradients so far (summed over params; resumable)."""
        return sum(state.get("skipped_steps", 0) for state in self.state.values())

    def _report_skips(self, streams: list[int], total: int) -> None:
        """Warn about the params skipped in this step; raise when one was skipped too often in a row."""
        params = [p for group in self.param_groups for p in group["params"]]
        worst = max(self.state[params[i]]["consecutive_skips"] for i in streams)
        limit = self.max_consecutive_skips
        where = f"param(s) {streams[:8]}{'...' if len(streams) > 8 else ''} ({len(streams)} of {total})"
        if limit is not None and worst >= limit:
            raise NonFiniteGradientError(
                f"IntLion: non-finite gradients in {worst} consecutive steps of {where}; training makes no progress "
                "(check the loss scale, learning rate and inputs, or raise `max_consecutive_skips`)."
            )
        warnings.warn(
            f"IntLion: non-finite gradient in {where}; skipped their update (momentum and weights unchanged), "
            f"{worst} consecutive skip(s) so far.",
            RuntimeWarning,
            stacklevel=3,
        )

    def _update(self, p: torch.Tensor, group: dict[str, Any], stream: int) -> bool:
        """Update ``p`` from its gradient; ``False`` (only the skip counters changed) if the gradient is not finite."""
        state, shard = self.state[p], _shard_index(p)
        p, grad_of_p = _local(p), _local(p.grad)  # an FSDP2 shard: this rank updates its own rows
        if not _grad_is_finite(grad_of_p):
            state["skipped_steps"] = state.get("skipped_steps", 0) + 1
            state["consecutive_skips"] = state.get("consecutive_skips", 0) + 1
            return False
        state.setdefault("step", 0)
        state["consecutive_skips"] = 0
        state["step"] += 1
        self._prepare_momentum(state, p, group)
        if integer_update.is_integer_weight(p):
            # One fused pass per row chunk (compiled or its eager twin, see `kernel`): direction, momentum, codes.
            key = counter_key(group["seed"], stream, state["step"], shard)
            integer_update.lion_momentum_update_(
                p, grad_of_p, state["momentum"], state.get("momentum_absmax"), group["lr"], group["weight_decay"],
                group["betas"], key, self.kernel,
            )  # fmt: skip
            refresh = getattr(p, "refresh_every", 0)
            if refresh and state["step"] % refresh == 0:
                integer_update.reselect_outliers_(p)
            return True
        # A float param (norms, biases, float embeddings) is updated through a flat view, chunk by chunk (a copy
        # written back at the end if it is not contiguous).
        flat = p.view(-1) if p.is_contiguous() else p.detach().reshape(-1).clone()
        flat_grad = grad_of_p.reshape(-1)
        align = group["block_size"] if "momentum_absmax" in state else 1
        for a, b in row_chunks(p.numel(), 1, align):
            momentum = self._momentum_chunk(state, a, b)
            direction = lion_direction_(momentum, flat_grad[a:b].float(), *group["betas"])
            self._store_momentum_chunk(state, momentum, a, b)
            flat[a:b].mul_(1.0 - group["lr"] * group["weight_decay"]).add_(direction.to(p.dtype), alpha=-group["lr"])
        if not p.is_contiguous():
            p.copy_(flat.view(p.shape))
        return True

    @staticmethod
    def _prepare_momentum(state: dict[str, Any], p: torch.Tensor, group: dict[str, Any]) -> None:
        """Allocate the momentum (zero) or convert it to the group's current storage format."""
        block = group["block_size"]
        if "momentum" not in state:
            if group["quantize_momentum"]:
                n_blocks = -(-p.numel() // block)
                state["momentum"] = torch.zeros(n_blocks, block, dtype=torch.int8, device=p.device)
                state["momentum_absmax"] = torch.full((n_blocks,), _TINY, dtype=torch.float32, device=p.device)
            else:
                state["momentum"] = torch.zeros(p.numel(), dtype=torch.float32, device=p.device).view(p.shape)
            return
        quantized = "momentum_absmax" in state
        if quantized == group["quantize_momentum"] and (not quantized or state["momentum"].shape[1] == block):
            return
        momentum = (
            dequantize_blockwise(state["momentum"], state.pop("momentum_absmax"), p.shape)
            if quantized
            else state["momentum"].float()
        )
        if group["quantize_momentum"]:
            state["momentum"], state["momentum_absmax"] = quantize_blockwise(momentum, block)
        else:
            state["momentum"] = momentum.contiguous()

    @staticmethod
    def _momentum_chunk(state: dict[str, Any], a: int, b: int) -> torch.Tensor:
        """The float32 momentum of flat entries ``a:b`` (a new tensor)."""
        if "momentum_absmax" not in state:
            return state["momentum"].view(-1)[a:b].clone()
        block = state["momentum"].shape[1]
        b0, b1 = a // block, -(-b // block)
        return dequantize_blocks(state["momentum"][b0:b1], state["momentum_absmax"][b0:b1])[: b - a]

    @staticmethod
    def _store_momentum_chunk(state: dict[str, Any], momentum: torch.Tensor, a: int, b: int) -> None:
        if "momentum_absmax" not in state:
            state["momentum"].view(-1)[a:b] = momentum
            return
        block = state["momentum"].shape[1]
        b0, b1 = a // block, -(-b // block)
        state["momentum"][b0:b1], state["momentum_absmax"][b0:b1] = quantize_blocks(momentum, block)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a saved state exactly: unlike ``Optimizer``'s default, float states keep their own dtype.

        (``torch.optim.Optimizer`` casts floating state tensors to the param dtype, which would round the float32
        momentum block scales of a bf16 model and break bit-identical resume.)
        """
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, p in zip(saved_ids, params):
            for key, value in saved_state.get(saved_id, {}).items():
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(device=p.device, copy=True)

    def _register_fused_hooks(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._fused_hook))

    def _fused_hook(self, p: torch.Tensor) -> None:
        group_index, stream = self._positions()[id(p)]
        with torch.no_grad():
            finite = self._update(p, self.param_groups[group_index], stream)
        p.grad = None  # the point of fused mode: this gradient is not kept until a global step()
        if not finite:
            self._report_skips([stream], 1)

    def remove_fused_hooks(self) -> None:
        """Stop fused updates (e.g. before switching to a Trainer-driven loop)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()


class _TrainerFactory:
    """Trainer's optimizer-factory protocol: ``Trainer`` calls ``factory()(model, **kwargs)``."""

    def __init__(self, optimizer_cls: type[IntLion] = IntLion) -> None:
        self.optimizer_cls = optimizer_cls

    def __call__(self, model: nn.Module, **kwargs: Any) -> IntLion:
        return self.optimizer_cls.from_model(model, **kwargs)


__all__ = ["IntLion", "NonFiniteGradientError"]
