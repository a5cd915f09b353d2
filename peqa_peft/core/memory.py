"""Model-state memory (weights, gradients, optimizer states) counted in bytes from the live tensors."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def _bytes(tensor: torch.Tensor) -> int:
    # Quantized tensor subclasses (QftWeight, Int8Grad) report the bytes of the tensors that actually store them.
    if hasattr(tensor, "storage_bytes"):
        return int(tensor.storage_bytes())
    if tensor.device.type == "meta":
        return 0
    return tensor.numel() * tensor.element_size()


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


__all__ = ["model_state_bytes"]
