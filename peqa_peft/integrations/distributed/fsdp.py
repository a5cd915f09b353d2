"""QFT under FSDP2 (``fully_shard``): integer weights sharded by rows, all-gathered as integers.

FSDP2 shards a parameter by splitting it along dim 0 (``torch.chunk``), keeps each rank's rows as the local tensor
of a ``DTensor`` and, before a module runs, all-gathers the shards. A ``QftWeight`` takes part as a tensor
subclass with FSDP2's all-gather extension (the design of torchao's int8 quantized training):

- **Sharding.** A shard holds its rows' uint8 codes, scales and zero-points, and the float outliers that fall in
  those rows with indices relative to the shard. All-gather inputs must have the same size on every rank, and the
  number of outliers differs from shard to shard, so every shard's outlier arrays are padded to the largest
  shard's count with ``pad_index(dtype)`` (the largest value of the index dtype, beyond every real index, so the
  sorted-index lookups of ``QftWeight`` skip the padding) and zeros. The count of each shard never changes
  (``reselect_outliers_`` keeps it), so neither does the padding.
- **All-gather.** ``fsdp_pre_all_gather`` hands FSDP2 the five integer/float fields; ``fsdp_post_all_gather``
  rebuilds the full ``QftWeight`` with codes/scales/zero-points viewing the gathered buffers and the outliers
  compacted back to global indices. Only integers and the small side tensors travel: about 1.1 bytes per entry.
- **Gradients.** FSDP2 reduce-scatters gradients through float buffers of one dtype, so under FSDP2 the gathered
  weight produces float gradients (``int8_grad`` off); each rank keeps the float gradient of its own rows. The
  optimizer (``IntLion``) updates each rank's rows in place (see ``peqa_peft.optim.int_lion``).
- **Saving and loading.** ``state_dict()`` of a sharded model gathers each integer weight (as integers, a
  collective: every rank calls it, as ``torch.distributed.checkpoint.state_dict.get_model_state_dict`` does) and
  ``load_state_dict`` loads each rank's rows of a full weight, so FSDP2's usual full-state-dict recipe saves and
  loads QFT adapters.

Sharding needs every integer weight's row count to be divisible by the number of shards (FSDP2 pads uneven shards
with rows an integer weight cannot represent); other layouts are refused with a clear error.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch

from ...core.qft.hooks import pad_index
from ...core.qft.weight import QftWeight

_WARNED = {"int8_grad": False}


def _outlier_counts(weight: QftWeight, rows_per_shard: int) -> torch.Tensor:
    """How many of ``weight``'s outliers fall in each shard of ``rows_per_shard`` rows."""
    shards = -(-weight.shape[0] // rows_per_shard)
    real = weight.outlier_idx[: weight.num_outliers].long()  # without a shard's padding slots
    owner = torch.div(real, rows_per_shard * weight.shape[1], rounding_mode="floor")
    return torch.bincount(owner, minlength=shards)


def shard_capacity(weight: QftWeight, rows_per_shard: int) -> int:
    """Outlier slots of every shard: the largest count of any shard (all-gather inputs must match in size)."""
    if not weight.num_outliers:
        return 0
    return int(_outlier_counts(weight, rows_per_shard).max())


def uneven_message(rows: int) -> str:
    """The error for a weight whose rows FSDP2 would split unevenly (or leave some rank without rows)."""
    return (
        f"QFT under FSDP2 needs every integer weight's rows to divide evenly into shards, one per rank: use a "
        f"number of ranks that divides {rows} (the rows of a {rows}-row weight)"
    )


def split_rows(weight: QftWeight, split_size: int, dim: int = 0, capacity: Optional[int] = None) -> list[QftWeight]:
    """``torch.split(weight, split_size)`` along the rows: one padded shard per chunk (FSDP2's sharding step).

    Each shard's outliers are padded to ``capacity`` slots (default: the largest shard's count).
    """
    if dim not in (0, -2):
        raise NotImplementedError("a QftWeight can only be sharded along its rows (dim 0), as FSDP2 does by default")
    rows, cols = weight.shape
    if rows % split_size:
        raise NotImplementedError(uneven_message(rows))
    needed = shard_capacity(weight, split_size)
    capacity = needed if capacity is None else capacity
    if needed > capacity:
        raise ValueError(f"a shard of this QFT weight holds {needed} outliers, more than its {capacity} slots")
    shards = []
    for r0 in range(0, rows, split_size):
        lo, hi = weight.outlier_range(r0, r0 + split_size)
        idx = torch.full((capacity,), pad_index(weight.outlier_idx.dtype), dtype=weight.outlier_idx.dtype)
        val = torch.zeros(capacity, dtype=weight.outlier_val.dtype)
        idx[: hi - lo] = weight.outlier_idx[lo:hi] - r0 * cols
        val[: hi - lo] = weight.outlier_val[lo:hi]
        rows_of = slice(r0, r0 + split_size)
        fields = (weight.codes[rows_of], weight.scale[rows_of], weight.zero_point[rows_of])
        shards.append(weight._rebuild(*fields, idx.to(weight.device), val.to(weight.device)))
    return shards


def new_zeros_shard(weight: QftWeight, size: list[int]) -> QftWeight:
    """An all-zero shard of ``size`` rows with the outlier capacity ``split_rows`` gives shards of that size."""
    if len(size) != 2 or size[1] != weight.shape[1]:
        raise NotImplementedError(f"a QftWeight of shape {tuple(weight.shape)} has no zero shard of size {size}")
    capacity = shard_capacity(weight, size[0])
    device = weight.device
    return weight._rebuild(
        torch.zeros(size, dtype=weight.codes.dtype, device=device),
        torch.ones(size[0], 1, dtype=weight.scale.dtype, device=device),
        torch.zeros(size[0], 1, dtype=weight.zero_point.dtype, device=device),
        torch.full((capacity,), pad_index(weight.outlier_idx.dtype), dtype=weight.outlier_idx.dtype, device=device),
        torch.zeros(capacity, dtype=weight.outlier_val.dtype, device=device),
    )


def pre_all_gather(weight: QftWeight, mesh: Any) -> tuple[tuple[torch.Tensor, ...], Any]:
    """FSDP2's all-gather inputs of a shard (its five fields) and the metadata ``post_all_gather`` needs."""
    return tuple(weight.state_tensors().values()), (mesh.size(), weight.refresh_every, weight.int8_grad)


def post_all_gather(
    outputs: tuple[torch.Tensor, ...], metadata: Any, dtype: torch.dtype, out: Optional[QftWeight] = None
) -> Optional[tuple[QftWeight, tuple[torch.Tensor, ...]]]:
    """The full weight from the gathered fields: outliers compacted to global indices, float gradients.

    Returns ``(weight, inner tensors FSDP2 may free)``; with ``out`` (FSDP2's later all-gathers) the gathered
    values are written into ``out`` instead, whose codes/scales/zero-points already view the gathered buffers.
    """
    codes, scale, zero, idx, val = outputs
    world, refresh_every, int8_grad = metadata
    rows_per_shard = codes.shape[0] // world
    idx, val = idx.view(world, -1), val.view(world, -1)
    used = idx != pad_index(idx.dtype)
    offsets = torch.arange(world, device=idx.device, dtype=idx.dtype).mul_(rows_per_shard * codes.shape[1])
    global_idx, global_val = (idx + offsets.view(-1, 1))[used], val[used]
    if out is not None:
        out.outlier_idx.copy_(global_idx)
        out.outlier_val.copy_(global_val)
        return None
    if int8_grad and not _WARNED["int8_grad"]:
        _WARNED["int8_grad"] = True
        warnings.warn(
            "QFT under FSDP2 computes float weight gradients (FSDP2 reduce-scatters gradients through float buffers); "
            "int8_gradients=True applies in one process and under DDP",
            RuntimeWarning,
            stacklevel=2,
        )
    weight = QftWeight(codes, scale, zero, global_idx, global_val, dtype, int8_grad=False, refresh_every=refresh_every)
    return weight, (codes, scale, zero, global_idx, global_val)


def _shard_group(param: torch.Tensor) -> Any:
    """The process group a ``DTensor`` param is sharded over (FSDP2 on a 1-D mesh)."""
    if param.device_mesh.ndim != 1:
        raise NotImplementedError("QFT weights can be gathered from a 1-D FSDP2 mesh only (not HSDP)")
    return param.device_mesh.get_group()


def gather_full(param: torch.Tensor) -> QftWeight:
    """The full integer weight of an FSDP2-sharded ``DTensor`` param (a collective: every rank calls it)."""
    import torch.distributed as dist

    group = _shard_group(param)
    world = dist.get_world_size(group)
    inputs, (_, refresh_every, _) = pre_all_gather(param._local_tensor, param.device_mesh)
    outputs = []
    for piece in inputs:
        gathered = piece.new_empty((world * piece.shape[0], *piece.shape[1:]))
        dist.all_gather_single(gathered, piece.contiguous(), group=group)
        outputs.append(gathered)
    weight, _ = post_all_gather(tuple(outputs), (world, refresh_every, False), param.dtype)
    weight.int8_grad = param._local_tensor.int8_grad
    return weight


def expose_fields(param: torch.Tensor) -> None:
    """Give a sharded ``DTensor`` param the field attributes (``codes``, ...) its shard has, as aliases.

    ``torch.distributed.checkpoint``'s ``get_model_state_dict`` resolves every state-dict key by attribute lookup
    (``...qft_weight.default.codes``), which works on a ``QftWeight`` but not on the ``DTensor`` wrapping a shard.
    """
    for name, tensor in param._local_tensor.state_tensors().items():
        setattr(param, name, tensor)


def load_full_(param: torch.Tensor, full: QftWeight) -> None:
    """Load the full weight ``full`` into this rank's shard of the FSDP2-sharded ``DTensor`` param, in place."""
    local = param._local_tensor
    rank = param.device_mesh.get_local_rank()
    shard = split_rows(full, local.shape[0], capacity=local.outlier_idx.numel())[rank]
    local.load_state_tensors_(shard.state_tensors())


__all__ = [
    "expose_fields",
    "gather_full",
    "load_full_",
    "new_zeros_shard",
    "pad_index",
    "post_all_gather",
    "pre_all_gather",
    "split_rows",
]
