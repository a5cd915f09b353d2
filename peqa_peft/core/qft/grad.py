"""The int8 gradient quantizer of QFT: one float32 absmax scale per row, codes rounded to nearest in [-127, 127].

Used by :class:`~peqa_peft.core.qft.int8_grad.Int8Grad` (chunk by chunk, as backward computes a weight gradient) and
by the int8 gradient all-reduce of :mod:`peqa_peft.integrations.distributed.ddp`.
"""

from __future__ import annotations

import torch

from .. import kernels

GRAD_MAXQ = 127

# Gradient rows whose largest entry is below this are stored as zero. They occur in an output head's rows for tokens
# far in the softmax tail (probabilities ~e^-70); once dequantized they are denormal floats, and every optimizer pass
# over denormals runs ~100x slower on CPUs (measured: IntLion steps of 15 s instead of 0.4 s on the demo model).
GRAD_ROW_FLOOR = 2.0**-100

# The scale ``quantize_grad_rows`` gives an all-zero row (its absmax 0, floored to the smallest normal float).
ZERO_ROW_SCALE = torch.finfo(torch.float32).tiny


def quantize_grad_rows(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and float32 per-row absmax scales ``(rows, 1)`` of a 2-D gradient block (round to nearest).

    One compiled pass (row maxima, then the codes) for blocks of at least ``COMPILE_MIN_WEIGHTS`` entries in compiled
    kernel mode, else the same function op by op: bit-identical results (tested).
    """
    if kernels.compiles(g.numel()):
        out = kernels.run_compiled("qft_grad_rows", _quantize_rows, g)
        if out is not None:
            return out
    return _quantize_rows(g)


def _quantize_rows(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Written without in-place ops or data-dependent branches so that torch.compile fuses it.
    g = g.float()
    absmax = g.abs().amax(dim=1, keepdim=True)
    negligible = absmax < GRAD_ROW_FLOOR
    absmax = torch.where(negligible, 0.0, absmax)
    scale = (absmax / GRAD_MAXQ).clamp_min(ZERO_ROW_SCALE)
    codes = torch.where(negligible, 0.0, g / scale).round().clamp(-GRAD_MAXQ, GRAD_MAXQ).to(torch.int8)
    return codes, scale


__all__ = ["GRAD_MAXQ", "GRAD_ROW_FLOOR", "ZERO_ROW_SCALE", "quantize_grad_rows"]
