"""Model-state memory (weights, gradients, optimizer states) counted in bytes from the live tensors."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes that really store ``tensor``; the one byte counter of the package and its benchmarks.

    ``numel() * element_size()`` is not the storage of three kinds of tensors: quantized subclasses with a
    ``storage_bytes()`` method (QFT's ``QftWeight`` / ``Int8Grad``) report it themselves; other traceable wrapper
    subclasses (torchao's low-bit optimizer states) hold the inner tensors named by ``__tensor_flatten__``; meta
    tensors hold nothing.
    """
    if hasattr(tensor, "storage_bytes"):
        return int(tensor.storage_bytes())
    if tensor.device.type == "meta":
        return 0
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, nn.Parameter):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


_bytes = tensor_bytes


def _key(tensor: torch.Tensor) -> tuple:
    if hasattr(tensor, "storage_bytes"):
        return ("subclass", id(tensor))
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel(), tensor.dtype)


def model_state_bytes(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> dict[str, int]:
    """Bytes of the model states that exist right now: ``{"weights", "gradients", "optimizer"}``.

    - ``weights``: every distinct parameter and buffer of ``model`` (tied or shared tensors once);
    - ``gradients``: every ``.grad`` currently held by those parameters (``0`` between steps, or in fused mode);
    - ``optimizer``: every tensor in ``optimizer.state`` (``0`` without an optimizer or before its first step).

    Compare with fp32 AdamW full fine-tuning, 16 bytes per parameter (4 weight + 4 grad + 8 states).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    seen: set = set()
    weights = gradients = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = _key(tensor)
        if key in seen:
            continue
        seen.add(key)
        weights += _bytes(tensor)
        grad = getattr(tensor, "grad", None)
        if grad is not None:
            gradients += _bytes(grad)
    state_bytes = 0
    if optimizer is not None:
        for state in optimizer.state.values():
            state_bytes += sum(_bytes(v) for v in state.values() if isinstance(v, torch.Tensor))
    return {"weights": weights, "gradients": gradients, "optimizer": state_bytes}


__all__ = ["model_state_bytes", "tensor_bytes"]
