"""Stochastic rounding with counter-based randomness: the noise of an entry is a hash of (key, row, column).

Rounding ``x`` to ``floor(x)`` or ``floor(x) + 1`` with probability equal to the fractional part makes the rounding
unbiased (``E[round(x)] == x``), which is what lets an update of a fraction of a quantization step still move an
integer weight on average.

The uniform numbers are not drawn from a generator: entry ``(r, c)`` of a tensor gets
``hash(key, r, c) / 2**24``, where ``key`` comes from ``(seed, stream, step, shard)`` alone (:func:`counter_key`).
So a run that resumes at step ``t`` draws exactly the numbers an uninterrupted run draws (no generator state to
save), any row range of a tensor gets the same numbers as the whole tensor (the results do not depend on how work
is cut into chunks), and -- the reason for the design -- the hash is a handful of int32 multiplies, shifts and xors
written in torch ops, so ``torch.compile`` fuses it into the kernel that consumes it and the compiled kernel draws
the same bits as eager PyTorch. (torch's own ``rand`` inside compiled code uses Inductor's Philox stream, which does
not reproduce eager's numbers.)

The hash is Chris Wellons' ``lowbias32`` (two multiply-xorshift rounds, multipliers below 2**31 so that they are
int32 scalars; int32 products wrap modulo 2**32 in eager PyTorch and in compiled code alike). A right shift of a
negative int32 is arithmetic in torch, so every shift is followed by a mask to make it logical.
"""

from __future__ import annotations

import torch

_M1, _M2 = 0x21F0AAAD, 0x735A2D97  # lowbias32's multipliers
_GOLDEN = 0x9E3779B9 - (1 << 32)  # the 32-bit golden-ratio constant as a signed int32: spreads consecutive columns
_MASK64 = (1 << 64) - 1
# Distinct odd multipliers keep (seed, stream, step, shard) tuples from colliding for any realistic values.
_SEED_MULT, _STREAM_MULT, _STEP_MULT, _SHARD_MULT = (
    0x9E3779B97F4A7C15,
    0x85EBCA77C2B2AE63,
    0xC2B2AE3D27D4EB4F,
    0x27D4EB2F165667C5,
)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _signed32(x: int) -> int:
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x >= 1 << 31 else x


def counter_key(seed: int, stream: int, step: int, shard: int = 0) -> tuple[int, int]:
    """Two int32 words naming the noise of one tensor at one step (a 64-bit hash of the four counters).

    ``stream`` tells apart the tensors of one optimizer, ``shard`` the ranks' pieces of one sharded parameter (FSDP2),
    which must not draw the same noise.
    """
    mixed = _splitmix64(
        (seed * _SEED_MULT + stream * _STREAM_MULT + step * _STEP_MULT + shard * _SHARD_MULT) & _MASK64
    )
    return _signed32(mixed), _signed32(mixed >> 32)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """``lowbias32`` of an int32 tensor (a bijection of 32-bit words with good avalanche), in torch ops."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _M1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _M2
    return x ^ ((x >> 15) & 0x1FFFF)


def counter_uniform(key: torch.Tensor, row0: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Uniform float32 numbers in ``[0, 1)`` (multiples of 2**-24) for rows ``row0 : row0 + rows`` of a tensor.

    ``key``: the int32 tensor ``(k0, k1)`` of :func:`counter_key`; ``row0``: a 0-dim int32 tensor (a tensor, not an
    int, so that a compiled caller does not specialize on it). Entry ``(r, c)`` depends only on ``key``, the
    absolute row ``row0 + r`` and ``c``.
    """
    device = key.device
    row = torch.arange(rows, dtype=torch.int32, device=device).view(-1, 1) + row0
    row_hash = mix32(mix32(row ^ key[0]) + key[1])  # (rows, 1): cheap, once per row
    col = torch.arange(cols, dtype=torch.int32, device=device).view(1, -1)
    bits = mix32(row_hash + col * _GOLDEN)
    return ((bits >> 8) & 0xFFFFFF).to(torch.float32) * (1.0 / (1 << 24))


def stochastic_round(x: torch.Tensor, key: torch.Tensor, row0: torch.Tensor) -> torch.Tensor:
    """``floor(x + u)`` with ``u`` of :func:`counter_uniform`: an unbiased rounding of the 2-D float tensor ``x``.

    ``x`` holds rows ``row0:`` of a tensor whose noise is named by ``key`` (a new float32 tensor is returned).
    """
    if not x.is_floating_point() or x.dim() != 2:
        raise TypeError(f"stochastic_round expects a 2-D floating point tensor, got {x.dtype} of shape {x.shape}")
    return torch.floor(x.float() + counter_uniform(key, row0, x.shape[0], x.shape[1]))


def key_tensor(key: tuple[int, int], device: torch.device) -> torch.Tensor:
    """The int32 tensor form of a :func:`counter_key`."""
    return torch.tensor(key, dtype=torch.int32, device=device)


__all__ = ["counter_key", "counter_uniform", "key_tensor", "mix32", "stochastic_round"]
