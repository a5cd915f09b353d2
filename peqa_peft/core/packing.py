"""Dense bit packing of b-bit integer codes (b = 1..8) into a flat ``uint8`` buffer.

Codes are packed in row-major order as one bit stream: code ``i`` occupies bits ``[b*i, b*(i+1))`` of the stream,
least significant bit first. Eight codes fill exactly ``b`` bytes, so ``n`` codes take ``ceil(n / 8) * b`` bytes
(``b * n / 8`` when ``n`` is a multiple of 8, as it is for every LLM weight). A 4-bit weight therefore costs half a
byte and a 3-bit weight three eighths of a byte, not one ``int8``.

Widths dividing 8 (1, 2, 4, 8) are packed byte-wise with ``uint8`` temporaries; the others go through one integer
word per eight codes (24 bits for b=3, so ``int32`` suffices; ``int64`` for 5..7 bits).
"""

from __future__ import annotations

import math

import torch


def packed_numel(numel: int, bits: int) -> int:
    """Number of bytes that :func:`pack_bits` produces for ``numel`` codes of ``bits`` bits."""
    return math.ceil(numel / 8) * bits


def _word_dtype(bits: int) -> torch.dtype:
    return torch.int32 if 8 * bits < 32 else torch.int64


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2^bits)`` (any shape, any integer dtype) into a flat ``uint8`` tensor."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    flat = codes.reshape(-1)
    if flat.numel() and int(flat.max()) >= 2**bits or (flat.numel() and int(flat.min()) < 0):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    if 8 % bits == 0:
        per_byte = 8 // bits
        grouped = flat.to(torch.uint8).view(-1, per_byte)
        shifts = torch.arange(0, 8, bits, device=flat.device, dtype=torch.uint8)
        return (grouped << shifts).sum(-1, dtype=torch.uint8) if per_byte > 1 else grouped.reshape(-1).clone()
    wdt = _word_dtype(bits)
    grouped = flat.to(wdt).view(-1, 8)
    code_shifts = torch.arange(0, 8 * bits, bits, device=flat.device, dtype=wdt)
    words = (grouped << code_shifts).sum(-1, dtype=wdt)
    byte_shifts = torch.arange(0, 8 * bits, 8, device=flat.device, dtype=wdt)
    return ((words.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` codes as a flat ``uint8`` tensor."""
    if packed.numel() != packed_numel(numel, bits):
        raise ValueError(f"{packed.numel()} packed bytes cannot hold {numel} codes of {bits} bits")
    if 8 % bits == 0:
        per_byte = 8 // bits
        if per_byte == 1:
            return packed[:numel]
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        codes = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)
        return codes.reshape(-1)[:numel]
    wdt = _word_dtype(bits)
    byte_shifts = torch.arange(0, 8 * bits, 8, device=packed.device, dtype=wdt)
    words = (packed.view(-1, bits).to(wdt) << byte_shifts).sum(-1, dtype=wdt)
    code_shifts = torch.arange(0, 8 * bits, bits, device=packed.device, dtype=wdt)
    codes = ((words.unsqueeze(-1) >> code_shifts) & (2**bits - 1)).to(torch.uint8)
    return codes.reshape(-1)[:numel]
