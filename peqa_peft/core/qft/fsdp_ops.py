"""The ops FSDP2's ``fully_shard`` applies to a ``QftWeight`` parameter, as dispatch handlers.

Sharding itself is distributed code in a higher layer (:mod:`peqa_peft.integrations.distributed.fsdp`), reached
through :func:`peqa_peft.core.qft.hooks.fsdp`; these handlers only translate FSDP2's tensor ops into calls of it.
:mod:`peqa_peft.core.qft.weight` registers :data:`HANDLERS` in ``QftWeight``'s op table; this module does not
import the weight type, so the arrow points one way (weight -> fsdp_ops -> hooks).
"""

from __future__ import annotations

from typing import Any

import torch

from . import hooks
from .dispatch import NOT_HANDLED

aten = torch.ops.aten


def _split(func: Any, args: tuple, kwargs: dict) -> Any:
    src = args[0]
    return hooks.fsdp().split_rows(src, args[1], args[2] if len(args) > 2 else kwargs.get("dim", 0))


def _new_zeros(func: Any, args: tuple, kwargs: dict) -> Any:
    return hooks.fsdp().new_zeros_shard(args[0], list(args[1]))


def _new_empty(func: Any, args: tuple, kwargs: dict) -> Any:
    # FSDP2's filler for ranks left without rows
    raise NotImplementedError(hooks.fsdp().uneven_message(args[0].shape[0]))


def _slice(func: Any, args: tuple, kwargs: dict) -> Any:
    src = args[0]
    where = {"dim": 0, "start": None, "end": None, "step": 1}
    where.update(zip(where, args[1:]), **kwargs)
    whole = (where["start"] or 0) == 0 and (where["end"] is None or where["end"] >= src.shape[0])
    if where["dim"] == 0 and whole and where["step"] == 1:
        return src._with(lambda t: t)  # FSDP2 narrows an evenly sharded weight to its full length
    raise NotImplementedError("a QftWeight can only be sliced whole (dequantize() it to take rows)")


def _view(func: Any, args: tuple, kwargs: dict) -> Any:
    src = args[0]
    if list(args[1]) in ([-1], [src.numel()], list(src.shape)):
        # FSDP2 keeps a flat view of each shard and re-strides gathered parameters; as in torchao's int8 training
        # weight, the "view" shares the fields and keeps the 2-D shape (the row scales need it).
        return src._with(lambda t: t)
    return NOT_HANDLED


HANDLERS = {
    aten.split.Tensor: _split,
    aten.new_zeros.default: _new_zeros,
    aten.new_empty.default: _new_empty,
    aten.slice.Tensor: _slice,
    aten.view.default: _view,
    aten._unsafe_view.default: _view,
    aten.as_strided.default: _view,
}

__all__ = ["HANDLERS"]
