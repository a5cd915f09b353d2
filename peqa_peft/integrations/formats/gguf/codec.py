"""GGUF block codec: llama.cpp's quantized blocks <-> PEQA's ``W = scale * (codes - zero)`` form.

Every block type below stores, per group of ``group_size`` consecutive inputs of a row, integer codes and an affine
map that is exactly PEQA's form (llama.cpp's ``ggml-quants.c`` and gguf-py's ``quants.py`` are the owners; the byte
layouts here follow gguf-py's ``dequantize_blocks`` and llama.cpp's ``block_*`` structs):

====== ==== ===== =============================== ====================== ==========================
type   bits group llama.cpp value                 PEQA scale             PEQA zero
====== ==== ===== =============================== ====================== ==========================
Q4_0   4    32    d*(q-8)                         d                      8 (uint8)
Q4_1   4    32    d*q + m                         d                      -m/d (float32)
Q5_0   5    32    d*(q-16)                        d                      16 (uint8)
Q5_1   5    32    d*q + m                         d                      -m/d (float32)
Q8_0   8    32    d*q, q int8                     d                      128 (uint8, codes = q+128)
Q2_K   2    16    d*sc*q - dmin*mn (4-bit sc, mn) d*sc                   dmin*mn/(d*sc) (float32)
Q3_K   3    16    d*sc*(q-4), sc 6-bit in -32..31 d*sc (may be negative) 4 (uint8)
Q4_K   4    32    d*sc*q - dmin*mn (6-bit sc, mn) d*sc                   dmin*mn/(d*sc) (float32)
Q5_K   5    32    as Q4_K with 5-bit q            d*sc                   dmin*mn/(d*sc) (float32)
Q6_K   6    16    d*sc*(q-32), sc int8            d*sc (may be negative) 32 (uint8)
====== ==== ===== =============================== ====================== ==========================

Precision (what the tests check): where the zero is an integer, ``scale * (codes - zero)`` in float32 equals
``gguf.quants.dequantize`` (and llama.cpp's ``dequantize_row_*``) bit for bit: every product involved is exact in
float32 (an fp16 mantissa times integers of at most 13 bits). Where the zero is fractional (a min term ``c``: value
``a*q + c``), llama.cpp rounds once and PEQA's form three times (zero, ``q - zero``, the product), so with
``u = 2**-24`` PEQA's value is within ``u*|c| + 2u*|a*q + c|`` of the exact one and llama.cpp's within
``u*|a*q + c|``: they differ by at most ``u*(|c| + 3|a*q + c|) <= 7u * max(|a|*(2**bits - 1), |c|)`` per group.
The tests assert ``8u``; measured maxima are 1.4-1.9u on llama.cpp's and the zoo models' blocks and 4.0u on random
blocks, and about half of the values differ in the last bit.

A group whose step is zero (``d == 0`` or ``sc == 0``) holds one constant value ``c`` (the min term, or 0); its
codes carry no information. Without a min term (or when ``c == 0``) it decodes to ``scale = 0`` with its codes kept
(so the bytes round-trip). With ``c != 0`` it decodes to ``codes = 0, zero = 1, scale = -c`` (``scale * (0 - 1) ==
c`` exactly; never a NaN or inf zero); the original codes are lost, so those blocks round-trip value-identical, not
byte-identical.

``encode`` is the inverse: for the legacy types it rounds d (and m) to the type's fp16 storage; for the K-quants it
returns blocks only when the per-group scales and mins factor exactly into fp16 ``d``/``dmin`` times the type's
integer sub-scales (checked by decoding the result), which holds for untouched layers and almost never after
tuning; ``encode_requantized`` re-fits them (grid plus least-squares search), keeping the codes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

__all__ = ["ADOPTABLE", "BlockGrid", "GRIDS", "decode", "encode", "encode_requantized", "weight_error"]

QK_K = 256  # values per K-quant super-block

ADOPTABLE: tuple[str, ...] = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


@dataclass(frozen=True)
class BlockGrid:
    """How a GGUF block type maps onto PEQA's grid.

    ``fractional_zero``: the zero-point is float32 (the type has a min term) instead of the uint8 ``fixed_zero``.
    ``block_size``/``type_size``: values and bytes per GGUF block (gguf's ``GGML_QUANT_SIZES``).
    """

    type_name: str
    bits: int
    group_size: int
    fractional_zero: bool
    block_size: int = 32
    type_size: int = 0
    fixed_zero: Optional[int] = None


GRIDS: dict[str, BlockGrid] = {
    "Q4_0": BlockGrid("Q4_0", 4, 32, False, 32, 18, 8),
    "Q4_1": BlockGrid("Q4_1", 4, 32, True, 32, 20),
    "Q5_0": BlockGrid("Q5_0", 5, 32, False, 32, 22, 16),
    "Q5_1": BlockGrid("Q5_1", 5, 32, True, 32, 24),
    "Q8_0": BlockGrid("Q8_0", 8, 32, False, 32, 34, 128),
    "Q2_K": BlockGrid("Q2_K", 2, 16, True, QK_K, 84),
    "Q3_K": BlockGrid("Q3_K", 3, 16, False, QK_K, 110, 4),
    "Q4_K": BlockGrid("Q4_K", 4, 32, True, QK_K, 144),
    "Q5_K": BlockGrid("Q5_K", 5, 32, True, QK_K, 176),
    "Q6_K": BlockGrid("Q6_K", 6, 16, False, QK_K, 210, 32),
}

# Integer range of the K-quant sub-scales (as llama.cpp interprets them: Q3_K's are stored +32) and of the mins.
_SC_RANGE = {"Q2_K": (0, 15), "Q3_K": (-32, 31), "Q4_K": (0, 63), "Q5_K": (0, 63), "Q6_K": (-128, 127)}
_MN_RANGE = {"Q2_K": (0, 15), "Q4_K": (0, 63), "Q5_K": (0, 63)}


def _grid(type_name: str) -> BlockGrid:
    if type_name not in GRIDS:
        raise ValueError(f"GGUF type {type_name!r} cannot be adopted; adoptable types are {', '.join(ADOPTABLE)}")
    return GRIDS[type_name]


# --------------------------------------------------------------------------------------------------------------
# Fields: the unpacked content of n blocks of one type. Legacy types: d (n,), m (n,) or None, q (n, 32).
# K-quants: d (n,), dmin (n,) or None, sc (n, G) int16, mn (n, G) int16 or None, q (n, 256).
# d/m/dmin stay float16 so that packing reproduces their exact bits (-0.0 included). q is the PEQA code
# (Q8_0: q + 128; Q3_K: q + 4; Q6_K: the stored 6 bits), uint8.
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Fields:
    d: np.ndarray
    q: np.ndarray
    m: Optional[np.ndarray] = None  # legacy min (Q4_1/Q5_1), or K-quant dmin
    sc: Optional[np.ndarray] = None
    mn: Optional[np.ndarray] = None


def _f16(b: np.ndarray) -> np.ndarray:
    """Two bytes per row -> float16 (n,) (little endian, as GGUF stores them)."""
    return np.ascontiguousarray(b).view("<f2").reshape(-1)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.astype("<f2")).view(np.uint8).reshape(-1, 2)


def _nibbles(b: np.ndarray) -> np.ndarray:
    """(n, k) bytes -> (n, 2k): low nibbles of all bytes, then high nibbles (the ggml order)."""
    return np.concatenate([b & 0x0F, b >> 4], axis=1)


def _unnibble(q: np.ndarray) -> np.ndarray:
    k = q.shape[1] // 2
    return (q[:, :k] & 0x0F) | (q[:, k:] << 4)


def _bits_of(b: np.ndarray, width: int, count: int) -> np.ndarray:
    """(n, L) bytes -> (n, count*L): field t (``width`` bits at bit ``t*width``) of byte l lands at ``t*L + l``."""
    shifts = (np.arange(count, dtype=np.uint8) * width).reshape(1, count, 1)
    return ((b[:, None, :] >> shifts) & ((1 << width) - 1)).reshape(b.shape[0], -1)


def _to_bits(v: np.ndarray, width: int, count: int) -> np.ndarray:
    """Inverse of :func:`_bits_of`: (n, count*L) values -> (n, L) bytes."""
    v = v.reshape(v.shape[0], count, -1).astype(np.uint8)
    out = np.zeros((v.shape[0], v.shape[2]), dtype=np.uint8)
    for t in range(count):
        out |= (v[:, t, :] & ((1 << width) - 1)) << np.uint8(t * width)
    return out


def _unpack(t: str, b: np.ndarray) -> _Fields:
    n = b.shape[0]
    if t == "Q4_0":
        return _Fields(_f16(b[:, 0:2]), _nibbles(b[:, 2:18]))
    if t == "Q4_1":
        return _Fields(_f16(b[:, 0:2]), _nibbles(b[:, 4:20]), m=_f16(b[:, 2:4]))
    if t in ("Q5_0", "Q5_1"):
        o = 2 if t == "Q5_0" else 4
        qh = _bits_of(b[:, o : o + 4], 1, 8)  # bit l of the little-endian uint32 at index l
        qh = qh.reshape(n, 8, 4).transpose(0, 2, 1).reshape(n, 32)
        q = _nibbles(b[:, o + 4 : o + 20]) | (qh << 4)
        return _Fields(_f16(b[:, 0:2]), q, m=_f16(b[:, 2:4]) if t == "Q5_1" else None)
    if t == "Q8_0":
        return _Fields(_f16(b[:, 0:2]), b[:, 2:34] ^ np.uint8(0x80))  # int8 q -> q + 128
    if t == "Q2_K":
        q = np.concatenate([_bits_of(b[:, 16 + 32 * c : 48 + 32 * c], 2, 4) for c in range(2)], axis=1)
        sc = b[:, 0:16]
        return _Fields(
            _f16(b[:, 80:82]), q, m=_f16(b[:, 82:84]), sc=(sc & 0x0F).astype(np.int16), mn=(sc >> 4).astype(np.int16)
        )
    if t == "Q3_K":
        ql = np.concatenate([_bits_of(b[:, 32 + 32 * c : 64 + 32 * c], 2, 4) for c in range(2)], axis=1)
        q = ql | (_bits_of(b[:, 0:32], 1, 8) << 2)  # hmask bit set: q - 4 + 4, i.e. code q + 4
        s = b[:, 96:108]
        raw = _nibbles(s[:, 0:8]) | (_bits_of(s[:, 8:12], 2, 4) << 4)
        return _Fields(_f16(b[:, 108:110]), q, sc=raw.astype(np.int16) - 32)
    if t in ("Q4_K", "Q5_K"):
        s = b[:, 4:16]
        lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
        sc = np.concatenate([lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30)], axis=1).astype(np.int16)
        mn = np.concatenate([mid & 0x3F, (hi >> 4) | ((mid >> 2) & 0x30)], axis=1).astype(np.int16)
        qs = b[:, 16:144] if t == "Q4_K" else b[:, 48:176]
        q = np.concatenate([_nibbles(qs[:, 32 * c : 32 * c + 32]) for c in range(4)], axis=1)
        if t == "Q5_K":
            q = q | (_bits_of(b[:, 16:48], 1, 8) << 4)
        return _Fields(_f16(b[:, 0:2]), q, m=_f16(b[:, 2:4]), sc=sc, mn=mn)
    if t == "Q6_K":
        ql = np.concatenate([_nibbles(b[:, 64 * c : 64 * c + 64]) for c in range(2)], axis=1)
        qh = np.concatenate([_bits_of(b[:, 128 + 32 * c : 160 + 32 * c], 2, 4) for c in range(2)], axis=1)
        return _Fields(_f16(b[:, 208:210]), ql | (qh << 4), sc=b[:, 192:208].view(np.int8).astype(np.int16))
    raise AssertionError(t)


def _pack(t: str, f: _Fields) -> np.ndarray:
    q = f.q.astype(np.uint8)
    d = _f16_bytes(f.d)
    if t == "Q4_0":
        return np.concatenate([d, _unnibble(q)], axis=1)
    if t == "Q4_1":
        return np.concatenate([d, _f16_bytes(f.m), _unnibble(q)], axis=1)
    if t in ("Q5_0", "Q5_1"):
        hb = (q >> 4).reshape(-1, 4, 8).transpose(0, 2, 1).reshape(-1, 32)
        parts = [d] + ([_f16_bytes(f.m)] if t == "Q5_1" else []) + [_to_bits(hb, 1, 8), _unnibble(q & 0x0F)]
        return np.concatenate(parts, axis=1)
    if t == "Q8_0":
        return np.concatenate([d, q ^ np.uint8(0x80)], axis=1)
    if t == "Q2_K":
        qs = [_to_bits(q[:, 128 * c : 128 * c + 128], 2, 4) for c in range(2)]
        sc = (f.sc.astype(np.uint8) & 0x0F) | (f.mn.astype(np.uint8) << 4)
        return np.concatenate([sc, *qs, d, _f16_bytes(f.m)], axis=1)
    if t == "Q3_K":
        hmask = _to_bits(q >> 2, 1, 8)
        qs = [_to_bits(q[:, 128 * c : 128 * c + 128] & 3, 2, 4) for c in range(2)]
        raw = (f.sc + 32).astype(np.uint8)
        scales = np.concatenate([_unnibble(raw[:, 0:16] & 0x0F), _to_bits(raw >> 4, 2, 4)], axis=1)
        return np.concatenate([hmask, *qs, scales, d], axis=1)
    if t in ("Q4_K", "Q5_K"):
        sc, mn = f.sc.astype(np.uint8), f.mn.astype(np.uint8)
        lo = (sc[:, 0:4] & 0x3F) | ((sc[:, 4:8] >> 4) << 6)
        mid = (mn[:, 0:4] & 0x3F) | ((mn[:, 4:8] >> 4) << 6)
        hi = (sc[:, 4:8] & 0x0F) | ((mn[:, 4:8] & 0x0F) << 4)
        qs = [_unnibble(q[:, 64 * c : 64 * c + 64] & 0x0F) for c in range(4)]
        qh = [_to_bits(q >> 4, 1, 8)] if t == "Q5_K" else []
        return np.concatenate([d, _f16_bytes(f.m), lo, mid, hi, *qh, *qs], axis=1)
    if t == "Q6_K":
        ql = [_unnibble(q[:, 128 * c : 128 * c + 128] & 0x0F) for c in range(2)]
        qh = [_to_bits(q[:, 128 * c : 128 * c + 128] >> 4, 2, 4) for c in range(2)]
        return np.concatenate([*ql, *qh, f.sc.astype(np.int8).view(np.uint8), d], axis=1)
    raise AssertionError(t)


# --------------------------------------------------------------------------------------------------------------
# decode
# --------------------------------------------------------------------------------------------------------------


def _blocks(t: str, raw: np.ndarray, in_features: int) -> tuple[np.ndarray, int]:
    """Validate ``raw`` and view it as (n_blocks, type_size) bytes; returns the blocks and the row count."""
    g = _grid(t)
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.ndim != 2:
        got = f"{type(raw).__name__} {getattr(raw, 'dtype', '')} {getattr(raw, 'shape', '')}"
        raise ValueError(f"{t}: raw must be a uint8 numpy array of shape (rows, bytes_per_row), got {got}")
    if in_features <= 0 or in_features % g.block_size:
        raise ValueError(f"{t}: in_features ({in_features}) must be a positive multiple of {g.block_size}")
    row_bytes = in_features // g.block_size * g.type_size
    if raw.shape[1] != row_bytes:
        raise ValueError(f"{t}: {in_features} inputs per row need {row_bytes} bytes per row, raw has {raw.shape[1]}")
    return np.ascontiguousarray(raw).reshape(-1, g.type_size), raw.shape[0]


def _check_finite(t: str, *fp16: Optional[np.ndarray]) -> None:
    for x in fp16:
        if x is not None and not np.isfinite(x).all():
            raise ValueError(f"{t}: a block has a non-finite fp16 scale or min (d/m/dmin); the tensor is corrupt")


def _group_view(f: _Fields, g: BlockGrid) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """codes (n_groups, group), step (n_groups,) float32, min term ``c`` (value = step*q + c) or None."""
    n = f.q.shape[0]
    d = f.d.astype(np.float32)
    if f.sc is None:  # legacy: one group per block
        return f.q, d, None if f.m is None else f.m.astype(np.float32)
    step = (d[:, None] * f.sc.astype(np.float32)).reshape(-1)  # exact: fp16 times <= 8-bit integer
    codes = f.q.reshape(-1, g.group_size)
    if f.mn is None:
        return codes, step, None
    c = -(f.m.astype(np.float32)[:, None] * f.mn.astype(np.float32)).reshape(-1)
    assert codes.shape[0] == n * (QK_K // g.group_size)
    return codes, step, c


def _affine_to_peqa(codes: np.ndarray, step: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``step*q + c`` -> (codes, scale, zero) with ``scale*(codes-zero)``; zero-step groups as the module says."""
    flat = step == 0
    zero = np.zeros_like(step)
    with np.errstate(divide="ignore", invalid="ignore"):
        np.divide(-c, step, out=zero, where=~flat)
    # A zero step with a zero min (all values 0): keep the codes, scale 0 and a signed zero chosen so that the min
    # re-encoded as -(scale*zero) has the stored sign bit (llama.cpp writes +0.0 for all-zero blocks).
    zero_min = flat & (c == 0)
    zero[zero_min] = np.where(np.signbit(step[zero_min]) ^ ~np.signbit(c[zero_min]), -0.0, 0.0)
    scale = step.copy()
    constant = flat & (c != 0)
    if constant.any():
        codes = codes.copy()
        codes[constant] = 0
        scale[constant] = -c[constant]
        zero[constant] = 1.0
    return codes, scale, zero


def decode(type_name: str, raw: np.ndarray, in_features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode one GGUF tensor's blocks into PEQA's ``(codes, scale, zero)``.

    ``raw``: the tensor's bytes as uint8 ``(rows, bytes_per_row)`` exactly as ``GGUFReader`` gives them. Returns
    ``codes`` uint8 ``(rows, in_features)``, ``scale`` float32 ``(rows, in_features // group_size)`` and ``zero``
    (uint8 filled with the type's fixed zero, or float32 where ``GRIDS[type_name].fractional_zero``) such that
    ``scale * (codes - zero)`` equals ``gguf.quants.dequantize(raw, type)``: bitwise for the fixed-zero types,
    to float32 rounding (``<= 2**-21 * max(|step|*(2**bits-1), |min|)`` per group) for the others.
    """
    g = _grid(type_name)
    blocks, rows = _blocks(type_name, raw, in_features)
    f = _unpack(type_name, blocks)
    _check_finite(type_name, f.d, f.m)
    codes, step, c = _group_view(f, g)
    n_groups = in_features // g.group_size
    if g.fractional_zero:
        codes, scale, zero = _affine_to_peqa(codes, step, c)
        zero_t = torch.from_numpy(zero.reshape(rows, n_groups))
    else:
        scale = step
        zero_t = torch.full((rows, n_groups), g.fixed_zero, dtype=torch.uint8)
    return (
        torch.from_numpy(np.ascontiguousarray(codes).reshape(rows, in_features)),
        torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32).reshape(rows, n_groups)),
        zero_t,
    )


# --------------------------------------------------------------------------------------------------------------
# encode
# --------------------------------------------------------------------------------------------------------------


def _as_numpy(t: str, codes, scale, zero) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate PEQA tensors for type ``t``; codes uint8 (rows, in), scale/zero float32 (rows, n_groups)."""
    g = _grid(t)

    def arr(x, name):
        if isinstance(x, torch.Tensor):
            x = x.detach().to("cpu").numpy()
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"{t}: {name} must be 2-D (rows, ...), got shape {x.shape}")
        return x

    codes, scale, zero = arr(codes, "codes"), arr(scale, "scale"), arr(zero, "zero")
    rows, in_features = codes.shape
    if in_features % g.block_size:
        raise ValueError(f"{t}: in_features ({in_features}) must be a multiple of the block size {g.block_size}")
    if codes.dtype.kind not in "iu":
        raise ValueError(f"{t}: codes must be an integer tensor, got {codes.dtype}")
    if codes.size and (codes.min() < 0 or codes.max() >= 1 << g.bits):
        raise ValueError(
            f"{t}: codes must lie in [0, {1 << g.bits}) for {g.bits} bits, got [{codes.min()}, {codes.max()}]"
        )
    want = (rows, in_features // g.group_size)
    for name, x in (("scale", scale), ("zero", zero)):
        if x.shape != want:
            raise ValueError(f"{t}: {name} must have shape {want} (group size {g.group_size}), got {x.shape}")
        if not np.isfinite(x.astype(np.float32)).all():
            raise ValueError(f"{t}: {name} has non-finite values")
    return codes.astype(np.uint8), scale.astype(np.float32), zero.astype(np.float32)


def _peqa_weight(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, group: int) -> np.ndarray:
    """``(codes - zero) * scale`` in float32, as QuantLinear computes it (peqa_peft.quant.quantizer.dequantize)."""
    q = codes.reshape(scale.shape[0], scale.shape[1], group).astype(np.float32)
    return ((q - zero[..., None]) * scale[..., None]).reshape(codes.shape)


def weight_error(type_name: str, raw: np.ndarray, codes, scale, zero) -> float:
    """Relative Frobenius error ``|dequantize(raw) - scale*(codes-zero)| / |scale*(codes-zero)|`` (gguf-py's
    dequantization of ``raw``; 0.0 for an all-zero weight that ``raw`` reproduces)."""
    import gguf

    c, s, z = _as_numpy(type_name, codes, scale, zero)
    target = _peqa_weight(c, s, z, _grid(type_name).group_size).astype(np.float64)
    got = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name]).astype(np.float64)
    err = float(np.linalg.norm(got - target))
    norm = float(np.linalg.norm(target))
    return err / norm if norm > 0 else (0.0 if err == 0 else float("inf"))


def encode(type_name: str, codes, scale, zero) -> Optional[np.ndarray]:
    """The raw uint8 ``(rows, bytes_per_row)`` blocks of ``type_name`` holding ``W = scale*(codes-zero)``.

    Legacy types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0): d (and m = -d*zero) are rounded to the type's fp16 storage; the
    result is ``None`` when a value overflows fp16 or, for Q4_0/Q5_0/Q8_0, when a zero is not the type's fixed
    zero (8/16/128). K-quants: blocks only when every group's scale is exactly ``fp16 d * integer sub-scale`` and
    its min ``scale*zero`` is ``fp16 dmin * integer min`` so that decoding the result gives the same weight bit for
    bit (verified), else ``None``. Untouched decoded tensors re-encode to their original bytes, except blocks with
    zero-step groups (see the module docstring) and K-quant super-blocks whose sub-scales share a common factor
    that llama.cpp's quantizer would not have produced (the factorisation is then ambiguous): value-identical.
    """
    c, s, z = _as_numpy(type_name, codes, scale, zero)
    g = GRIDS[type_name]
    if g.block_size == 32:
        return _encode_legacy(type_name, c, s, z)
    return _encode_k(type_name, c, s, z)


def _encode_legacy(t: str, c: np.ndarray, s: np.ndarray, z: np.ndarray) -> Optional[np.ndarray]:
    g = GRIDS[t]
    rows = c.shape[0]
    s, z = s.reshape(-1), z.reshape(-1)
    if not g.fractional_zero and not (z == g.fixed_zero).all():
        return None
    with np.errstate(over="ignore"):
        d = s.astype(np.float16)
        m = (-(s * z)).astype(np.float16) if g.fractional_zero else None
    if not np.isfinite(d).all() or (m is not None and not np.isfinite(m).all()):
        return None
    return _pack(t, _Fields(d, c.reshape(-1, 32), m=m)).reshape(rows, -1)


def _preference(lo: int, hi: int) -> list[int]:
    """Candidate sub-scales for the group with the largest |value|, most llama.cpp-like first.

    llama.cpp maps that group to the end of the range: 63/15 for the unsigned sub-scales, -32 (Q3_K) / -128 (Q6_K)
    for the signed ones (``d = -max/32``): so the largest magnitude first, negative before positive.
    """
    out = []
    for k in range(max(hi, -lo), 0, -1):
        out += [x for x in (-k, k) if lo <= x <= hi]
    return out


def _factor(
    v: np.ndarray, must: np.ndarray, lo: int, hi: int, exact: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per super-block (rows of ``v``), fp16 ``d`` and integers ``k`` in [lo, hi] with ``d*k == v`` where ``must``.

    ``exact``: float32 ``d*k`` must equal ``v`` bitwise (scales); else to 2**-20 relative (mins, which are only
    known as ``scale*zero``; the caller verifies the decoded weight). Returns d (float16), k (int16), ok (bool).
    """
    n = v.shape[0]
    d = np.zeros(n, dtype=np.float16)
    k = np.zeros(v.shape, dtype=np.int16)
    mag = np.where(must, np.abs(v), -1.0)
    ref = v[np.arange(n), mag.argmax(axis=1)]
    nonzero = (mag > 0).any(axis=1)
    ok = ~nonzero & (np.where(must, v, 0) == 0).all(axis=1)  # all-zero super-blocks: d = 0
    pending = nonzero.copy()
    for cand in _preference(lo, hi):
        idx = np.nonzero(pending)[0]
        if idx.size == 0:
            break
        with np.errstate(over="ignore", under="ignore"):
            dc = (ref[idx] / np.float32(cand)).astype(np.float16)
        d32 = dc.astype(np.float32)[:, None]
        vv = v[idx]
        with np.errstate(divide="ignore", invalid="ignore"):
            kk = np.rint(vv / d32)
        kk = np.where(np.isfinite(kk), kk, lo - 1)
        inrange = (kk >= lo) & (kk <= hi)
        with np.errstate(invalid="ignore", over="ignore"):
            prod = d32 * kk.astype(np.float32)
        good = (prod == vv) if exact else (np.abs(prod - vv) <= np.abs(vv) * 2.0**-20)
        valid = (np.isfinite(d32[:, 0]) & (d32[:, 0] != 0)) & ((inrange & good) | ~must[idx]).all(axis=1)
        hit = idx[valid]
        d[hit] = dc[valid]
        k[hit] = np.where(inrange[valid] & must[hit], kk[valid], 0).astype(np.int16)
        ok[hit] = True
        pending[hit] = False
    return d, k, ok


def _encode_k(t: str, c: np.ndarray, s: np.ndarray, z: np.ndarray) -> Optional[np.ndarray]:
    g = GRIDS[t]
    rows = c.shape[0]
    G = QK_K // g.group_size
    codes = c.reshape(-1, G, g.group_size)
    s, z = s.reshape(-1, G), z.reshape(-1, G)
    lo, hi = _SC_RANGE[t]
    # Tuned scales almost never factor: a few super-blocks tell, before the candidate search runs over all.
    probe = s[:4]
    if not _factor(probe, ~(codes[:4] == codes[:4, :, :1]).all(axis=2), lo, hi, exact=True)[2].all():
        return None
    if not g.fractional_zero:
        if not (z == g.fixed_zero).all():
            return None
        d, sc, ok = _factor(s, np.ones_like(s, dtype=bool), lo, hi, exact=True)
        if not ok.all():
            return None
        blocks = _pack(t, _Fields(d, codes.reshape(-1, QK_K), sc=sc))
    else:
        # Groups whose codes are all equal hold one value: they may be stored with sub-scale 0 (their value in the
        # min term), which is how decode represents llama.cpp's zero-step groups (codes 0, zero 1).
        constant = (codes == codes[..., :1]).all(axis=2)
        canonical_flat = constant & (codes[..., 0] == 0) & (z == 1)
        d, sc, ok = _factor(s, ~constant, lo, hi, exact=True)
        d32 = d.astype(np.float32)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            kk = np.rint(s / d32)
        fits = constant & ~canonical_flat & np.isfinite(kk) & (kk >= lo) & (kk <= hi)
        fits &= d32 * np.where(fits, kk, 0).astype(np.float32) == s
        sc = np.where(fits, kk, sc).astype(np.int16)
        flat = constant & ~fits
        codes = np.where(flat[..., None], 0, codes)
        value = _peqa_weight(c, s.reshape(rows, -1), z.reshape(rows, -1), g.group_size)
        value = value.reshape(-1, G, g.group_size)[..., 0]
        mins = np.where(flat, -value, s * z)  # dmin * mn
        sc = np.where(flat, 0, sc).astype(np.int16)
        mlo, mhi = _MN_RANGE[t]
        dmin, mn, ok_m = _factor(mins, np.ones_like(mins, dtype=bool), mlo, mhi, exact=False)
        if not (ok & ok_m).all():
            return None
        blocks = _pack(t, _Fields(d, codes.reshape(-1, QK_K).astype(np.uint8), m=dmin, sc=sc, mn=mn))
    blocks = blocks.reshape(rows, -1)
    # Exactness is decided by decoding: the weight must come back bit for bit.
    c2, s2, z2 = decode(t, blocks, c.shape[1])
    w_in = _peqa_weight(c, s.reshape(rows, -1), z.reshape(rows, -1), g.group_size)
    w_out = _peqa_weight(c2.numpy(), s2.numpy(), z2.numpy().astype(np.float32), g.group_size)
    return blocks if np.array_equal(w_in, w_out) else None


# --------------------------------------------------------------------------------------------------------------
# encode_requantized
# --------------------------------------------------------------------------------------------------------------


def encode_requantized(type_name: str, codes, scale, zero, iterations: int = 4) -> tuple[np.ndarray, float]:
    """Blocks of ``type_name`` approximating ``W = scale*(codes-zero)`` with the codes kept; and the relative
    Frobenius error ``|W_blocks - W| / |W|`` they introduce.

    K-quants: per super-block, fp16 ``d``/``dmin`` and the integer sub-scales/mins minimising the squared weight
    error: starting from llama.cpp's own choice (largest group at the end of the range), ``iterations`` rounds of a
    +-5% grid over ``d`` then ``dmin`` (as llama.cpp's ``make_qkx`` searches its scale) and the least-squares
    ``d``/``dmin`` given the integers; for each candidate the best integers per group (the floor/ceil corners of
    the continuous optimum). When :func:`encode` is exact its blocks are returned (error 0.0). Legacy types:
    :func:`encode` (fp16 rounding) and its error; ``ValueError`` when the type cannot hold the weight at all.

    The sub-scales' resolution (1/63 of the largest group's scale for Q4_K/Q5_K, 1/15 for Q2_K) bounds what a
    re-fit keeps of a small tuning delta: on Gemma 3 270M's blk.0 layers with scales moved by 1% (random), the
    error is 0.67% for Q4_K and 0.29% for Q6_K (vs 1% for the untuned file); with 0.2% it is 0.195% for both.
    """
    c, s, z = _as_numpy(type_name, codes, scale, zero)
    g = GRIDS[type_name]
    exact = encode(type_name, c, s, z)
    if exact is not None:
        return exact, _relative_error(type_name, exact, c, s, z)
    if g.block_size == 32:
        raise ValueError(
            f"{type_name} cannot hold this weight (a zero differs from {g.fixed_zero} or a value overflows fp16)"
        )
    if not g.fractional_zero and not (z == g.fixed_zero).all():
        raise ValueError(f"{type_name} has the fixed zero-point {g.fixed_zero}; these zeros differ from it")
    blocks = _requantize_k(type_name, c, s, z, iterations)
    return blocks, _relative_error(type_name, blocks, c, s, z)


def _relative_error(t: str, blocks: np.ndarray, c, s, z) -> float:
    g = GRIDS[t]
    target = _peqa_weight(c, s, z, g.group_size).astype(np.float64)
    c2, s2, z2 = decode(t, blocks, c.shape[1])
    got = _peqa_weight(c2.numpy(), s2.numpy(), z2.numpy().astype(np.float32), g.group_size).astype(np.float64)
    norm = float(np.linalg.norm(target))
    err = float(np.linalg.norm(got - target))
    return err / norm if norm > 0 else (0.0 if err == 0 else float("inf"))


def _requantize_k(t: str, c: np.ndarray, s: np.ndarray, z: np.ndarray, iterations: int) -> np.ndarray:
    g = GRIDS[t]
    rows = c.shape[0]
    G, gs = QK_K // g.group_size, g.group_size
    q = c.reshape(-1, G, gs).astype(np.float64)
    s64, z64 = s.reshape(-1, G).astype(np.float64), z.reshape(-1, G).astype(np.float64)
    lo, hi = _SC_RANGE[t]
    # Per group, W_i = s*q_i - m with m = s*z; the new weight is a*q_i - b with a = d*sc, b = dmin*mn, so the
    # squared error is (a-s)^2*Q2 - 2(a-s)(b-m)*Q1 + (b-m)^2*n with the code moments Q1 = sum q, Q2 = sum q^2.
    if not g.fractional_zero:  # no min term: W_i = s*(q_i - z0), z0 fixed
        q = q - g.fixed_zero
    Q1, Q2, n = q.sum(axis=2), (q * q).sum(axis=2), float(gs)
    m64 = s64 * z64 if g.fractional_zero else np.zeros_like(s64)

    def fp16(x):
        with np.errstate(over="ignore"):
            return x.astype(np.float16).astype(np.float64)

    def err(a, b):
        da, db = a - s64, b - m64
        return (da * da * Q2 - 2 * da * db * Q1 + db * db * n).sum(axis=1)

    def ints(d, dmin):
        """Best integers per group given d, dmin: the 2x2 continuous optimum's floor/ceil corners."""
        with np.errstate(divide="ignore", invalid="ignore"):
            xs = np.where(d[:, None] != 0, s64 / d[:, None], 0.0)
        if not g.fractional_zero:
            return np.clip(np.rint(xs), lo, hi), np.zeros_like(xs)
        mlo, mhi = _MN_RANGE[t]
        with np.errstate(divide="ignore", invalid="ignore"):
            xm = np.where(dmin[:, None] != 0, m64 / dmin[:, None], 0.0)
        best, best_e = None, None
        for fa in (np.floor, np.ceil):
            for fb in (np.floor, np.ceil):
                sc = np.clip(fa(xs), lo, hi)
                mn = np.clip(fb(xm), mlo, mhi)
                da, db = d[:, None] * sc - s64, dmin[:, None] * mn - m64
                e = da * da * Q2 - 2 * da * db * Q1 + db * db * n
                if best is None:
                    best, best_e = (sc, mn), e
                else:
                    better = e < best_e
                    best = (np.where(better, sc, best[0]), np.where(better, mn, best[1]))
                    best_e = np.where(better, e, best_e)
        return best

    def solve(sc, mn):
        """Least-squares d, dmin given the integers (2x2 normal equations per super-block)."""
        a11 = (sc * sc * Q2).sum(axis=1)
        a12 = -(sc * mn * Q1).sum(axis=1)
        a22 = (mn * mn * n).sum(axis=1)
        # right-hand side: sum over values of [sc*q; -mn] * W
        w1 = (sc * (s64 * Q2 - m64 * Q1)).sum(axis=1)
        w2 = -(mn * (s64 * Q1 - m64 * n)).sum(axis=1)
        if not g.fractional_zero:
            with np.errstate(divide="ignore", invalid="ignore"):
                d = np.where(a11 > 0, w1 / a11, 0.0)
            return d, np.zeros_like(d)
        det = a11 * a22 - a12 * a12
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.where(det > 0, (w1 * a22 - w2 * a12) / det, np.where(a11 > 0, w1 / a11, 0.0))
            dmin = np.where(det > 0, (a11 * w2 - a12 * w1) / det, np.where(a22 > 0, w2 / a22, 0.0))
        return d, dmin

    # llama.cpp's start: the largest |scale| maps to the end of the range (sign as in _preference).
    k0 = _preference(lo, hi)[0]
    ref = s64[np.arange(s64.shape[0]), np.abs(s64).argmax(axis=1)]
    d = fp16(ref / k0)
    if g.fractional_zero:
        mref = m64[np.arange(m64.shape[0]), np.abs(m64).argmax(axis=1)]
        dmin = fp16(mref / _MN_RANGE[t][1])
    else:
        dmin = np.zeros_like(d)
    sc, mn = ints(d, dmin)
    best = (d, dmin, sc, mn)
    best_e = err(d[:, None] * sc, dmin[:, None] * mn)

    def consider(d, dmin):
        nonlocal best, best_e
        d = np.where(np.isfinite(d), d, best[0])
        dmin = np.where(np.isfinite(dmin), dmin, best[1])
        sc, mn = ints(d, dmin)
        e = err(d[:, None] * sc, dmin[:, None] * mn)
        better = e < best_e
        best = tuple(
            np.where(better.reshape((-1,) + (1,) * (x.ndim - 1)), x, b) for x, b in zip((d, dmin, sc, mn), best)
        )
        best_e = np.where(better, e, best_e)

    # Alternate: a relative grid around the current d (then dmin), as llama.cpp's make_qkx searches its scale,
    # and the least-squares d/dmin given the current integers; every candidate is rounded to fp16 first.
    grid = np.linspace(-0.05, 0.05, 51)
    for _ in range(iterations):
        for delta in grid:
            consider(fp16(best[0] * (1 + delta)), best[1])
        if g.fractional_zero:
            for delta in grid:
                consider(best[0], fp16(best[1] * (1 + delta)))
        d, dmin = solve(best[2], best[3])
        consider(fp16(d), fp16(dmin))
    d, dmin, sc, mn = best
    f = _Fields(
        d.astype(np.float16),
        c.reshape(-1, QK_K),
        m=dmin.astype(np.float16) if g.fractional_zero else None,
        sc=sc.astype(np.int16),
        mn=mn.astype(np.int16) if g.fractional_zero else None,
    )
    return _pack(t, f).reshape(rows, -1)
