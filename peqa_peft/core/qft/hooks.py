"""Where QFT's integer weight and gradient call distributed code, which lives in a higher layer.

The core never imports :mod:`peqa_peft.integrations.distributed`: that package registers its functions here when it
is imported (``import peqa_peft`` does), so the import arrows keep pointing one way (integrations -> core). Without a
registration the core behaves as a single process: gradient chunks are not averaged and FSDP2's sharding ops are
refused with a clear error.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any, Optional

import torch

_HOOKS: dict[str, Any] = {"sync_grad_chunk": None, "fsdp": None}


def register_distributed(sync_grad_chunk: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], fsdp: ModuleType):
    """Install the DDP gradient sync (``sync_grad_chunk(chunk, weight) -> chunk``, averages a float gradient chunk
    in place) and the FSDP2 module (``split_rows``, ``new_zeros_shard``, ``uneven_message``, ``pre_all_gather``,
    ``post_all_gather``) the integer weight dispatches to."""
    _HOOKS["sync_grad_chunk"] = sync_grad_chunk
    _HOOKS["fsdp"] = fsdp


def sync_grad_chunk_(chunk: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Average ``chunk`` (a float gradient chunk of ``weight``) over ranks when a sync is registered."""
    sync: Optional[Callable] = _HOOKS["sync_grad_chunk"]
    return chunk if sync is None else sync(chunk, weight)


def fsdp() -> ModuleType:
    """The registered FSDP2 support module."""
    if _HOOKS["fsdp"] is None:
        raise RuntimeError("FSDP2 support for QftWeight is not registered: import peqa_peft.integrations.distributed")
    return _HOOKS["fsdp"]


def pad_index(dtype: torch.dtype) -> int:
    """The outlier index that marks an unused (padding) slot of an FSDP2 shard: larger than every real index."""
    return torch.iinfo(dtype).max


__all__ = ["fsdp", "pad_index", "register_distributed", "sync_grad_chunk_"]
