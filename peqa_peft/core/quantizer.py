"""Asymmetric uniform b-bit quantization with a zero-point, per output channel or per group of input columns.

The quantizer is the one of PEQA (Kim et al., 2023), eq. (1)::

    W_hat = s0 * (clamp(round(W / s0) + z0, 0, 2^b - 1) - z0)

with ``s0``/``z0`` of shape ``(out_features, n_groups)``; ``n_groups == 1`` is the per-channel setting. Scales and
zero-points are chosen to minimise ``||W - W_hat||_F^2`` by a search over the width and placement of each group's
grid (``method="mse"``, the default), or taken from the plain min/max range (``method="minmax"``, round-to-nearest).

Everything here is plain PyTorch and works on any device; it is the reference the fused ops are tested against.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch

from . import kernels

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
QuantMethod = Literal["mse", "minmax"]

# Row chunk for the MSE search: bounds the temporaries to about this many elements per candidate.
_SEARCH_CHUNK_ELEMENTS = 1 << 22
# The compiled search reads each chunk once per candidate: a chunk of this many weights (1 MiB) stays in cache.
_FUSED_SEARCH_CHUNK_ELEMENTS = 1 << 18


def validate_bits(bits: int) -> None:
    """Raise a ``ValueError`` unless ``bits`` is an integer bit width this package can pack (2..8)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"`bits` must be one of {SUPPORTED_BITS} (PEQA uses 2, 3, 4 or 8), got {bits!r}.")


# The default group size, ``group_size="auto"``: chosen on a real pretrained model (benchmarks/real_models.py,
# SmolLM2-135M), where the 4-bit MSE initialization costs x2.8 WikiText-2 perplexity per channel (the former
# default), x1.47 at group 64 and x1.25 at group 32, the smallest group measured (docs: real-model tables).
# "auto" is resolved once per model, when the layers are quantized, to one concrete value stored in the config
# (so a saved adapter reloads onto the identical grid):
AUTO = "auto"
AUTO_GROUP_SIZE = 32


def resolve_auto_group_size(in_features: list[int]) -> Optional[int]:
    """``group_size="auto"`` for a model whose targeted layers have these ``in_features``.

    ``AUTO_GROUP_SIZE`` (32) when it divides every layer's ``in_features`` (true of real LLMs, whose widths are
    multiples of 64), else ``None`` (per output channel) for the whole model, e.g. the bundled demo model whose
    688-wide ``down_proj`` 32 does not divide. One value for all layers, because every export format (compressed-
    tensors, GPTQ, GGUF) stores one grid per model; ``None`` also when there is no layer to quantize.
    """
    if in_features and all(n % AUTO_GROUP_SIZE == 0 for n in in_features):
        return AUTO_GROUP_SIZE
    return None


def resolve_auto_init_method(group_size) -> QuantMethod:
    """``init_method="auto"`` for a model quantized with ``group_size`` (resolved first): ``"mse"`` with groups,
    ``"minmax"`` (round-to-nearest) per output channel.

    Why (4-bit, WikiText-2 x fp32, ``benchmarks/real_models.py``): with groups the MSE search is the better data-free
    init (group 32: 0.99 vs RTN 1.21 on Gemma 3 270M, 1.16 vs 1.29 on SmolLM2-135M); per channel, minimising each
    row's weight error clips the few large weights the model needs, and RTN is far better (Gemma 2.51 vs 9.42,
    SmolLM2 1.73 vs 2.93).
    """
    return "minmax" if group_size is None else "mse"


def validate_group_size(group_size: Optional[int], in_features: Optional[int] = None, name: str = "") -> None:
    """Raise a ``ValueError`` unless ``group_size`` is ``None`` (per channel) or a positive divisor of in_features.

    ``"auto"`` (see :func:`resolve_auto_group_size`) is accepted where no layer is given yet (a config).
    """
    if group_size is None:
        return
    if group_size == AUTO:
        if in_features is None:
            return
        raise ValueError("group_size='auto' is resolved for a whole model (resolve_auto_group_size), not per layer")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(
            f"`group_size` must be 'auto', None (per output channel) or a positive int, got {group_size!r}."
        )
    if in_features is not None and in_features % group_size != 0:
        where = f" of module '{name}'" if name else ""
        raise ValueError(
            f"`group_size={group_size}` does not divide in_features={in_features}{where}; choose a divisor of "
            f"in_features, use group_size=None (per output channel), or exclude the module via `exclude_modules`."
        )


def validate_quant_settings(
    bits: int, group_size: Optional[int], init_method: str, grid: int, max_shrink: float
) -> None:
    """Raise a ``ValueError`` unless these are valid PEQA quantization settings (shared by both config classes)."""
    validate_bits(bits)
    validate_group_size(group_size)
    if init_method not in (AUTO, "mse", "minmax"):
        raise ValueError(f"`init_method` must be 'auto', 'mse' or 'minmax', got {init_method!r}")
    if grid < 1 or not 0.0 <= max_shrink < 1.0:
        raise ValueError(f"need search_grid >= 1 and 0 <= max_shrink < 1, got {grid} and {max_shrink}")


def num_groups(in_features: int, group_size: Optional[int]) -> int:
    """Number of quantization groups per output row."""
    return 1 if group_size is None else in_features // group_size


def _grouped(weight: torch.Tensor, group_size: Optional[int]) -> torch.Tensor:
    out_features, in_features = weight.shape
    return weight.reshape(out_features, num_groups(in_features, group_size), -1)


def _qparams_from_range(xmin: torch.Tensor, xmax: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    scale = ((xmax - xmin) / maxq).clamp_min(torch.finfo(torch.float32).tiny)
    zero = torch.round(-xmin / scale).clamp_(0, maxq)
    return scale, zero


def _range(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's ``[min, max]`` widened to include 0 (exact zeros stay representable; constant groups get +-1)."""
    xmin = w.amin(-1).clamp(max=0)
    xmax = w.amax(-1).clamp(min=0)
    degenerate = (xmax - xmin) == 0
    xmin = torch.where(degenerate, -torch.ones_like(xmin), xmin)
    xmax = torch.where(degenerate, torch.ones_like(xmax), xmax)
    return xmin, xmax


def _span(w: torch.Tensor, xmin: torch.Tensor, xmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's own ``[min, max]``; a constant group keeps its widened range (see :func:`_range`)."""
    lo, hi = w.amin(-1), w.amax(-1)
    flat = hi == lo
    return torch.where(flat, xmin, lo), torch.where(flat, xmax, hi)


# The MSE search's candidates. Each is (ratio, placement): placement 0 is round-to-nearest over the 0-widened range
# (only at ratio 1: the search is never worse than "minmax"); 1 and 2 put a grid of ``ratio`` times the group's own
# span around the span's centre, the zero-point rounded down or up. An integer zero-point moves the grid in whole
# steps, so a rounded range clips one end by up to half a step; the two placements and ratios above 1 (up to
# 1 + MAX_EXPAND) let the grid cover the group instead. Measured at 4-bit group 32 (benchmarks/real_models.py):
# WikiText-2 x fp32 from 1.111 to 0.992 on Gemma 3 270M, 1.249 to 1.157 on SmolLM2-135M.
MAX_EXPAND = 0.15
_MINMAX, _DOWN, _UP = 0, 1, 2


def _candidates(grid: int, max_shrink: float) -> tuple[list[float], list[int]]:
    """``(ratios, placements)`` in search order: round-to-nearest first, then ratios ``1, 1 - 1/grid, ...`` down to
    ``1 - max_shrink`` and ``1 + 1/grid, ...`` up to ``1 + MAX_EXPAND``, each placed rounded down then up."""
    shrink = [1.0 - i / grid for i in range(int(max_shrink * grid))]
    expand = [1.0 + i / grid for i in range(1, int(MAX_EXPAND * grid) + 1)]
    ratios, placements = [1.0], [_MINMAX]
    for ratio in shrink + expand:
        ratios += [ratio, ratio]
        placements += [_DOWN, _UP]
    return ratios, placements


def _candidate_qparams(xmin, xmax, lo, hi, ratio, placement, maxq: int):
    """Scales and integer zero-points of candidates ``(ratio, placement)`` (1-D tensors): ``(candidates, *groups)``."""
    shape = (-1,) + (1,) * xmin.dim()
    ratio, placement = ratio.view(shape), placement.view(shape)
    rtn_scale, rtn_zero = _qparams_from_range(xmin, xmax, maxq)
    scale = (ratio * (hi - lo) / maxq).clamp_min(torch.finfo(torch.float32).tiny)
    centre = maxq / 2 - (lo + hi) / (2 * scale)
    zero = (torch.floor(centre) + (placement == _UP).float()).clamp(0, maxq)
    minmax = placement == _MINMAX
    return torch.where(minmax, rtn_scale, scale), torch.where(minmax, rtn_zero, zero)


def _all_candidate_errors(w, xmin, xmax, lo, hi, ratio, placement, maxq: int):
    """Squared errors ``(candidates, rows, groups)`` of candidates ``(ratio, placement)``, with their scales and
    zero-points; compiled, the candidates x weights broadcast becomes one reduction loop that never materializes it.
    """
    scale, zero = _candidate_qparams(xmin, xmax, lo, hi, ratio, placement, maxq)
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    q = torch.clamp(torch.round(w / s) + z, 0, maxq)
    return ((q - z) * s - w).pow(2).sum(-1), scale, zero


def _search_inputs(w: torch.Tensor, grid: int, max_shrink: float):
    xmin, xmax = _range(w)
    lo, hi = _span(w, xmin, xmax)
    ratios, placements = _candidates(grid, max_shrink)
    ratio = torch.tensor(ratios, dtype=torch.float32, device=w.device)
    placement = torch.tensor(placements, dtype=torch.float32, device=w.device)
    return xmin, xmax, lo, hi, ratio, placement


def _search_chunk(w: torch.Tensor, maxq: int, method: QuantMethod, grid: int, max_shrink: float):
    """One candidate at a time: the plain reference of the search (several passes over ``w`` per candidate)."""
    if method == "minmax":
        return _qparams_from_range(*_range(w), maxq)
    xmin, xmax, lo, hi, ratio, placement = _search_inputs(w, grid, max_shrink)
    best_err = best_scale = best_zero = None
    for i in range(ratio.numel()):
        err, scale, zero = _all_candidate_errors(w, xmin, xmax, lo, hi, ratio[i : i + 1], placement[i : i + 1], maxq)
        if best_err is None:
            best_err, best_scale, best_zero = err[0], scale[0], zero[0]
            continue
        better = err[0] < best_err
        best_err = torch.where(better, err[0], best_err)
        best_scale = torch.where(better, scale[0], best_scale)
        best_zero = torch.where(better, zero[0], best_zero)
    return best_scale, best_zero


def _fused_search_chunk(w: torch.Tensor, maxq: int, grid: int, max_shrink: float):
    """The MSE search with all candidates in one compiled pass; the first best candidate wins, as in the loop."""
    inputs = _search_inputs(w, grid, max_shrink)
    result = kernels.run_compiled("mse_search", _all_candidate_errors, w, *inputs, maxq)
    if result is None:  # compiling failed: the candidate loop
        return _search_chunk(w, maxq, "mse", grid, max_shrink)
    err, scale, zero = result
    best = err.argmin(0, keepdim=True)  # argmin returns the first minimum: ties keep the earlier candidate
    return scale.gather(0, best)[0], zero.gather(0, best)[0]


@torch.no_grad()
def compute_qparams(
    weight: torch.Tensor,
    bits: int,
    group_size: Optional[int] = None,
    method: QuantMethod = "mse",
    grid: int = 100,
    max_shrink: float = 0.8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose scales and zero-points for ``weight`` (``out_features x in_features``).

    Args:
        weight: the full-precision weight; it is read in float32 and not modified.
        bits: bit width ``b``; codes lie in ``[0, 2^b - 1]``.
        group_size: ``None`` for one scale per output channel, else the number of input columns sharing a scale.
        method: ``"mse"`` keeps, per group, the candidate grid with the lowest squared error: round-to-nearest, and
            grids of ``1 - max_shrink .. 1 + MAX_EXPAND`` times the group's span (steps of ``1/grid``) centred on it
            with the zero-point rounded down or up (see :data:`MAX_EXPAND`); ``"minmax"`` uses the full range
            widened to include 0 (round-to-nearest).
        grid: the MSE search's candidate widths are ``1/grid`` apart.
        max_shrink: the largest fraction of a group's span that a candidate may clip away.

    Returns:
        ``(scale, zero_point)``, float32 tensors of shape ``(out_features, n_groups)``; zero-points are integers.
    """
    validate_bits(bits)
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    validate_group_size(group_size, weight.shape[1])
    if method not in ("mse", "minmax"):
        raise ValueError(f"`method` must be 'mse' or 'minmax', got {method!r}")
    if not 0.0 <= max_shrink < 1.0 or grid < 1:
        raise ValueError(f"need grid >= 1 and 0 <= max_shrink < 1, got grid={grid}, max_shrink={max_shrink}")
    maxq = 2**bits - 1
    w = _grouped(weight.detach().float(), group_size)
    fused = method == "mse" and kernels.compiles(weight.numel())
    chunk = _FUSED_SEARCH_CHUNK_ELEMENTS if fused else _SEARCH_CHUNK_ELEMENTS
    rows = max(1, chunk // max(1, weight.shape[1]))
    scales, zeros = [], []
    for start in range(0, w.shape[0], rows):
        block = w[start : start + rows]
        if fused:
            s, z = _fused_search_chunk(block, maxq, grid, max_shrink)
        else:
            s, z = _search_chunk(block, maxq, method, grid, max_shrink)
        scales.append(s)
        zeros.append(z)
    return torch.cat(scales), torch.cat(zeros)


@torch.no_grad()
def quantize(
    weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, group_size: Optional[int] = None
) -> torch.Tensor:
    """Integer codes ``clamp(round(W / s) + z, 0, 2^b - 1)`` as ``uint8`` of the weight's shape."""
    maxq = 2**bits - 1
    w = _grouped(weight.detach().float(), group_size)
    q = torch.clamp(torch.round(w / scale.float().unsqueeze(-1)) + zero_point.float().unsqueeze(-1), 0, maxq)
    return q.to(torch.uint8).reshape(weight.shape)


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    group_size: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``s * (q - z)`` for unpacked codes ``(out_features, in_features)``; differentiable in ``s`` and ``z``."""
    q = _grouped(codes, group_size).to(dtype)
    w = (q - zero_point.to(dtype).unsqueeze(-1)) * scale.to(dtype).unsqueeze(-1)
    return w.reshape(codes.shape)


@torch.no_grad()
def quantize_weight(
    weight: torch.Tensor, bits: int, group_size: Optional[int] = None, method: QuantMethod = "mse", **search_kwargs
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, scale, zero_point)`` of a float ``(out_features, in_features)`` weight (the one float quantizer).

    :func:`compute_qparams` (``method``, ``grid``, ``max_shrink``) then :func:`quantize`; codes are ``uint8`` of the
    weight's shape, ``scale`` / ``zero_point`` float32 ``(out_features, n_groups)``. Used by ``QuantLinear``, the
    transformers quantizer (quantize-on-load), QFT's ``QftWeight`` and :func:`fake_quantize`.
    """
    scale, zero = compute_qparams(weight, bits, group_size, method, **search_kwargs)
    return quantize(weight, scale, zero, bits, group_size), scale, zero


def fake_quantize(
    weight: torch.Tensor, bits: int, group_size: Optional[int] = None, method: QuantMethod = "mse", **search_kwargs
) -> torch.Tensor:
    """Quantize then dequantize ``weight`` (in its own dtype): the RTN / PEQA-init reference in one call."""
    codes, scale, zero = quantize_weight(weight, bits, group_size, method, **search_kwargs)
    return dequantize(codes, scale, zero, group_size, dtype=weight.dtype)
