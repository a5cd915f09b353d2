"""Blockwise int8 storage for optimizer states (the layout of bitsandbytes' 8-bit states, with a cheap codebook).

A state tensor is flattened and cut into blocks of ``block_size`` entries; each block stores one float32 absmax and
``int8`` codes. Instead of a linear grid the codes use square-root companding, ``x = absmax * sign(c) * (c/127)^2``,
which (like bitsandbytes' dynamic map) spends more codes near zero, where most momentum entries are: the relative
error of an entry at 1% of its block's maximum is ~8% instead of ~80% with a linear grid.
"""

from __future__ import annotations

import math

import torch

_MAXC = 127


def quantize_blocks(flat: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``(n_blocks, block_size)`` and absmax ``(n_blocks,)`` of a flat float tensor (zero-padded at the end)."""
    n_blocks = -(-flat.numel() // block_size)
    if flat.numel() == n_blocks * block_size:
        blocks = flat.float().view(n_blocks, block_size).clone()
    else:
        blocks = torch.zeros(n_blocks * block_size, dtype=torch.float32, device=flat.device)
        blocks[: flat.numel()] = flat
        blocks = blocks.view(n_blocks, block_size)
    absmax = blocks.abs().amax(dim=1).clamp_min_(torch.finfo(torch.float32).tiny)
    return compand(blocks.div_(absmax.unsqueeze(1))), absmax


def compand(normed: torch.Tensor) -> torch.Tensor:
    """int8 codes ``c = sign(x) * round(127 * sqrt(|x|))`` of block-normalized values ``x`` in ``[-1, 1]``.

    Exactly: ``|c|`` is the integer nearest to ``sqrt(t)``, ``t = fl(|x| * 127**2)``, found by correcting a rounded
    square root with exact comparisons ``(c +- 1/2)**2`` vs ``t`` (ties go up). The correction makes the codes the
    same whatever ``sqrt`` computes them: eager PyTorch's vectorized float32 ``sqrt`` is not always correctly rounded
    (1 ulp off) while compiled kernels' is, and IntLion's compiled and eager updates must agree bit for bit.
    """
    t = normed.abs() * float(_MAXC * _MAXC)
    c = torch.round(torch.sqrt(t))
    c = c + ((c + 0.5) * (c + 0.5) <= t).float() - (((c - 0.5) * (c - 0.5) > t) & (c > 0)).float()
    return (torch.sign(normed) * c).to(torch.int8)


def dequantize_blocks(codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """The flat float32 tensor (``n_blocks * block_size`` entries, padding included) of :func:`quantize_blocks`."""
    y = codes.float().div_(_MAXC)
    return y.abs().mul_(y).mul_(absmax.unsqueeze(1)).view(-1)  # sign(c) * (c/127)^2 * absmax


def quantize_blockwise(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, absmax)``: int8 codes of shape ``(n_blocks, block_size)`` and float32 ``absmax`` ``(n_blocks,)``."""
    return quantize_blocks(x.detach().reshape(-1).float(), block_size)


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The float32 tensor of ``shape`` stored by :func:`quantize_blockwise`."""
    return dequantize_blocks(codes, absmax)[: math.prod(shape)].reshape(shape)


__all__ = ["compand", "dequantize_blocks", "dequantize_blockwise", "quantize_blocks", "quantize_blockwise"]
