"""QFT under ``DistributedDataParallel``: integer weights stay out of DDP's buckets, their gradients are synced here.

DDP all-reduces gradients through float buckets as large as all gradients together, and copies each gradient into
them: for QFT that would be a full float gradient copy (4 bytes per parameter, four times the int8 gradient) and an
op (``mul.out`` into the bucket) an ``Int8Grad`` cannot do. So the integer weights are left out of DDP (its
``_ddp_params_and_buffers_to_ignore`` protocol, which the QFT tuner answers; float parameters such as norms stay
with DDP) and each weight-gradient chunk is all-reduced right where backward computes it, in float32 and before it
is quantized to int8 (``sync_grad_chunk_``), over a process group of its own.

Two ways to average (``QftConfig.ddp_gradient_sync``):

- ``"fp32"`` (default): an fp32 all-reduce. Every rank then quantizes the same averaged chunk exactly as one
  process would at the same global batch, so ranks stay bit-identical (IntLion's rounding noise is seeded by
  parameter and step, not rank) and the gradients equal one process's up to float summation order.
- ``"int8"``: each rank quantizes its chunk to int8 codes with per-row scales and the ranks all-gather them (codes
  with different scales cannot be summed in transit); every rank averages the dequantized chunks in the same order,
  so ranks stay bit-identical, but the gradient is rounded twice. Measured on the demo model
  (``benchmarks/qft_grad_allreduce.py``): the stored gradient's relative error grows from 1.0% to 1.3% (2 ranks)
  for 1.01 instead of 4 bytes received per entry; the all-gather's traffic grows with the ranks (3.0 vs 6 bytes
  at 4 ranks, 7.1 vs 7 at 8), so it only pays on few ranks.

Every chunk is synced in every backward, also inside DDP's ``no_sync()`` (gradient accumulation): the result is the
same, with more messages.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ...core.qft.grad import quantize_grad_rows
from ...core.qft.weight import QftWeight

_GROUP: dict[str, Optional[object]] = {"group": None}


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def enable_grad_sync(weights: list[torch.Tensor], mode: str = "fp32") -> None:
    """Mark ``weights`` (``QftWeight``\\ s) for gradient averaging in backward; creates the sync process group.

    ``mode``: ``"fp32"`` (all-reduce) or ``"int8"`` (all-gather of int8 codes and row scales), see above.

    Called on every rank at the same point (when DDP wraps the model and asks which parameters to ignore), as
    ``torch.distributed.new_group`` requires. A no-op outside a multi-process run.
    """
    if not _active():
        return
    if _GROUP["group"] is None:
        # A group of its own: these all-reduces run inside backward while DDP's bucket all-reduces are in flight.
        _GROUP["group"] = dist.new_group(backend=dist.get_backend())
    if mode not in _SYNC:
        raise ValueError(f"gradient sync must be one of {sorted(_SYNC)}, got {mode!r}")
    for weight in weights:
        weight.sync_grads = mode


def _average_fp32_(chunk: torch.Tensor) -> None:
    dist.all_reduce(chunk, op=dist.ReduceOp.SUM, group=_GROUP["group"])
    chunk.div_(dist.get_world_size())


def _average_int8_(chunk: torch.Tensor) -> None:
    world = dist.get_world_size()
    codes, scale = quantize_grad_rows(chunk)
    all_codes = codes.new_empty((world * codes.shape[0], codes.shape[1]))
    all_scales = scale.new_empty((world * scale.shape[0], 1))
    dist.all_gather_single(all_codes, codes, group=_GROUP["group"])
    dist.all_gather_single(all_scales, scale, group=_GROUP["group"])
    all_codes, all_scales = all_codes.view(world, *codes.shape), all_scales.view(world, *scale.shape)
    average = all_codes[0].float().mul_(all_scales[0])
    for rank in range(1, world):  # the same order on every rank: bit-identical results
        average.add_(all_codes[rank].float().mul_(all_scales[rank]))
    chunk.copy_(average.div_(world))


_SYNC = {"fp32": _average_fp32_, "int8": _average_int8_}


def sync_grad_chunk_(chunk: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Average a float gradient chunk of ``weight`` over all ranks in place (when ``weight`` is DDP-trained)."""
    mode = getattr(weight, "sync_grads", False)
    if mode and _active():
        _SYNC[mode](chunk)
    return chunk


def ddp_ignored_names(model: torch.nn.Module, prefixes: tuple[str, ...], mode: str = "fp32") -> list[str]:
    """Names (under each of ``prefixes``) of ``model``'s integer weights, which DDP must leave alone.

    Also marks them for gradient averaging in ``mode`` (see :func:`enable_grad_sync`).
    """
    weights = [(name, p) for name, p in model.named_parameters() if isinstance(p, QftWeight)]
    enable_grad_sync([p for _, p in weights], mode)
    return [prefix + name for prefix in prefixes for name, _ in weights]


__all__ = ["ddp_ignored_names", "enable_grad_sync", "sync_grad_chunk_"]
