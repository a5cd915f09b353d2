"""Stochastic rounding with counter-based (seed, stream, step) randomness.

Rounding ``x`` to ``floor(x)`` or ``floor(x) + 1`` with probability equal to the fractional part makes the rounding
unbiased (``E[round(x)] == x``), which is what lets an update of a fraction of a quantization step still move an
integer weight on average. The random numbers come from a generator seeded by ``(seed, stream, step)`` alone, so a
run that resumes at step ``t`` draws exactly the numbers an uninterrupted run draws: no generator state needs saving.
"""

from __future__ import annotations

from typing import Optional

import torch

# Distinct odd multipliers keep (seed, stream, step, shard) tuples from colliding for any realistic values.
_SEED_MULT, _STREAM_MULT, _STEP_MULT, _SHARD_MULT = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F
_SEED_MASK = (1 << 63) - 1


def counter_generator(seed: int, stream: int, step: int, device: torch.device, shard: int = 0) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` whose state depends only on ``(seed, stream, step, shard)``.

    ``shard`` tells apart the ranks' pieces of one sharded parameter (FSDP2), which must not draw the same noise.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(
        (seed * _SEED_MULT + stream * _STREAM_MULT + step * _STEP_MULT + shard * _SHARD_MULT) & _SEED_MASK
    )
    return generator


def stochastic_round(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``floor(x + u)`` with ``u ~ U[0, 1)``: an unbiased rounding of the float tensor ``x`` (a new tensor)."""
    if not x.is_floating_point():
        raise TypeError(f"stochastic_round expects a floating point tensor, got {x.dtype}")
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    return noise.add_(x.float()).floor_()


__all__ = ["counter_generator", "stochastic_round"]
