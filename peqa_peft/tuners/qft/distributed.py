"""QFT under ``DistributedDataParallel``: integer weights stay out of DDP's buckets, their gradients are synced here.

DDP all-reduces gradients through float buckets as large as all gradients together, and copies each gradient into
them: for QFT that would be a full float gradient copy (4 bytes per parameter, four times the int8 gradient) and an
op (``mul.out`` into the bucket) an ``Int8Grad`` cannot do. So the integer weights are left out of DDP (its
``_ddp_params_and_buffers_to_ignore`` protocol, which the QFT tuner answers; float parameters such as norms stay
with DDP) and each weight-gradient chunk is all-reduced right where backward computes it, in float32 and before it
is quantized to int8 (``sync_grad_chunk_``), over a process group of its own.

Why float, not int8: every rank then quantizes the same averaged chunk exactly as one process would at the same
global batch, so ranks stay bit-identical (IntLion's rounding noise is seeded by parameter and step, not rank) and
the gradients equal one process's up to float summation order. Averaging int8 codes instead would round twice
(the paper's per-rank int8 gradients, then the average) for a quarter of the traffic; it is not implemented.

Every chunk is synced in every backward, also inside DDP's ``no_sync()`` (gradient accumulation): the result is the
same, with more messages.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

_GROUP: dict[str, Optional[object]] = {"group": None}


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def enable_grad_sync(weights: list[torch.Tensor]) -> None:
    """Mark ``weights`` (``QftWeight``\\ s) for gradient all-reduce in backward; creates the sync process group.

    Called on every rank at the same point (when DDP wraps the model and asks which parameters to ignore), as
    ``torch.distributed.new_group`` requires. A no-op outside a multi-process run.
    """
    if not _active():
        return
    if _GROUP["group"] is None:
        # A group of its own: these all-reduces run inside backward while DDP's bucket all-reduces are in flight.
        _GROUP["group"] = dist.new_group(backend=dist.get_backend())
    for weight in weights:
        weight.sync_grads = True


def sync_grad_chunk_(chunk: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Average a float gradient chunk of ``weight`` over all ranks in place (when ``weight`` is DDP-trained)."""
    if getattr(weight, "sync_grads", False) and _active():
        dist.all_reduce(chunk, op=dist.ReduceOp.SUM, group=_GROUP["group"])
        chunk.div_(dist.get_world_size())
    return chunk


def ddp_ignored_names(model: torch.nn.Module, prefixes: tuple[str, ...]) -> list[str]:
    """Names (under each of ``prefixes``) of ``model``'s integer weights, which DDP must leave alone."""
    from .tensor import QftWeight

    weights = [(name, p) for name, p in model.named_parameters() if isinstance(p, QftWeight)]
    enable_grad_sync([p for _, p in weights])
    return [prefix + name for prefix in prefixes for name, _ in weights]


__all__ = ["ddp_ignored_names", "enable_grad_sync", "sync_grad_chunk_"]
