"""One set of checks for every quantized tensor peqa_peft takes from a file, whoever wrote it.

Saved PEQA/QFT adapters (``tuners.peqa.validation``, ``tuners.qft.validation``) and the layers adopted from quantized
checkpoints (compressed-tensors and GPTQ readers in ``tuners.peqa.backends``, the GGUF reader) all call these
functions, so a NaN scale or an out-of-grid zero-point is refused the same way wherever it comes from. Everything
here only reads its arguments; callers run it for *every* layer before they replace any module, so a refused
checkpoint leaves the model as it was.

Each check raises a ``ValueError`` whose one-line message starts with ``where`` (the file and/or layer, e.g.
``"ckpt/model.safetensors: layer 'model.layers.0.self_attn.k_proj'"``) and names the tensor and the problem.

The checks:

- :func:`check_dtype`: floating point where values are real numbers, integers where they are codes;
- :func:`check_shape`: exactly the shape the layer needs;
- :func:`check_finite` / :func:`check_scales`: no NaN/inf; scales ``> 0`` unless ``sign="any"`` (GGUF's K-quant
  blocks legitimately store negative sub-block minima and llama.cpp's Q4_0/Q5_0 pick a negative ``d`` whenever the
  largest-magnitude weight of a block is positive, so the GGUF reader passes ``sign="any"``; a zero scale is still
  finite and allowed there);
- :func:`check_grid`: integral values inside the ``bits``-bit grid (unsigned ``[0, 2^b-1]`` or signed
  ``[-2^(b-1), 2^(b-1)-1]``), for codes and zero-points;
- :func:`check_padding_bits`: the unused bits of the last word of a bit-packed row are zero (any bit pattern
  decodes to in-grid values, so padding is the only place where a packed tensor can show it was not written by
  the packer);
- :func:`check_scheme_tensors`: a format's declared scheme agrees with the tensors the file stores (e.g. a
  ``symmetric: true`` config with stored zero-points, or an asymmetric one without them);
- :func:`check_quantized_layer`: all of the above for one layer ``W = scale * (codes - zero_point)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, Optional

import torch

__all__ = [
    "check_dtype",
    "check_finite",
    "check_grid",
    "check_padding_bits",
    "check_quantized_layer",
    "check_scales",
    "check_scheme_tensors",
    "check_shape",
]


def check_dtype(tensor: torch.Tensor, kind: Literal["float", "int", "uint8"], where: str, name: str) -> None:
    """``kind``: ``"float"`` (any floating point dtype), ``"int"`` (any integer dtype) or exactly ``"uint8"``."""
    ok = {
        "float": tensor.is_floating_point(),
        "int": not tensor.is_floating_point() and not tensor.is_complex() and tensor.dtype != torch.bool,
        "uint8": tensor.dtype == torch.uint8,
    }[kind]
    if not ok:
        want = {"float": "floating point", "int": "integer", "uint8": "uint8"}[kind]
        raise ValueError(f"{where}: '{name}' has dtype {tensor.dtype}; it must be {want}")


def check_shape(tensor: torch.Tensor, shape: Iterable[int], where: str, name: str, why: str = "") -> None:
    """``tensor.shape`` must equal ``shape`` (``why`` explains where the expected shape comes from)."""
    shape = tuple(int(s) for s in shape)
    if tuple(tensor.shape) != shape:
        reason = f" ({why})" if why else ""
        raise ValueError(f"{where}: '{name}' has shape {tuple(tensor.shape)}, expected {shape}{reason}")


def _first_bad(mask: torch.Tensor) -> str:
    """Where the first ``True`` of ``mask`` is, as ``row 3`` / ``index (3, 0)`` (for messages)."""
    index = tuple(int(i) for i in torch.nonzero(mask)[0].tolist())
    if len(index) == 1:
        return f"index {index[0]}"
    return f"row {index[0]}" if len(index) == 2 else f"index {index}"


def check_finite(tensor: torch.Tensor, where: str, name: str) -> None:
    """No NaN or inf (integer tensors are always finite)."""
    if tensor.is_floating_point() and tensor.numel():
        bad = ~torch.isfinite(tensor)
        if bad.any():
            count = int(bad.sum())
            raise ValueError(f"{where}: '{name}' contains {count} NaN or inf values (first at {_first_bad(bad)})")


def check_scales(
    scale: torch.Tensor,
    where: str,
    name: str = "scale",
    sign: Literal["positive", "any"] = "positive",
    shape: Optional[Iterable[int]] = None,
) -> None:
    """A quantization scale: floating point, finite, of ``shape`` if given, and ``> 0`` unless ``sign="any"``.

    ``sign="positive"`` is right for compressed-tensors, GPTQ and PEQA's own ``s0`` (their observers clamp scales to
    a positive minimum, so zero or a negative value is corruption: it collapses or mirrors the layer's weights).
    """
    check_dtype(scale, "float", where, name)
    if shape is not None:
        check_shape(scale, shape, where, name)
    check_finite(scale, where, name)
    if sign == "positive" and scale.numel():
        bad = scale <= 0
        if bad.any():
            raise ValueError(
                f"{where}: '{name}' must be positive, but {int(bad.sum())} of {scale.numel()} values are <= 0 "
                f"(first at {_first_bad(bad)}: {float(scale[tuple(torch.nonzero(bad)[0])]):g})"
            )
    elif sign not in ("positive", "any"):
        raise ValueError(f"sign must be 'positive' or 'any', got {sign!r}")


def grid_range(bits: int, signed: bool = False) -> tuple[int, int]:
    """The inclusive range of a ``bits``-bit grid."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def check_grid(values: torch.Tensor, bits: int, where: str, name: str, signed: bool = False) -> None:
    """Integral values inside the ``bits``-bit grid (unsigned ``[0, 2^b-1]``, or signed when ``signed``)."""
    lo, hi = grid_range(bits, signed)
    if values.is_floating_point():
        check_finite(values, where, name)
        if not torch.equal(values, values.round()):
            raise ValueError(f"{where}: '{name}' holds fractional values; it must be integers of a {bits}-bit grid")
    if not values.numel():
        return
    bad = (values < lo) | (values > hi)
    if bad.any():
        first = tuple(torch.nonzero(bad)[0])
        raise ValueError(
            f"{where}: '{name}' has {int(bad.sum())} values outside [{lo}, {hi}] for {bits} bits (first at "
            f"{_first_bad(bad)}: {values[first].item():g})"
        )


def check_padding_bits(words: torch.Tensor, used_bits: int, where: str, name: str, dim: int = -1) -> None:
    """The bits of ``words`` past the first ``used_bits`` along ``dim`` (LSB-first packing) must be zero.

    ``words``: integer words (any width) that pack ``used_bits`` bits per line along ``dim``, lowest bits first, as
    compressed-tensors' ``pack_to_int32`` and GPTQ do. Only the last word of a line can have padding.
    """
    word_bits = words.element_size() * 8
    n_words = words.shape[dim]
    spare = n_words * word_bits - used_bits
    if spare < 0:
        raise ValueError(f"{where}: '{name}' has {n_words} words along dim {dim}, too few for {used_bits} bits")
    if spare == 0:
        return
    if spare >= word_bits:
        raise ValueError(
            f"{where}: '{name}' has {n_words} words along dim {dim}, more than {used_bits} bits need; "
            "the packed shape does not match the layer"
        )
    last = words.select(dim, n_words - 1).to(torch.int64) & ((1 << word_bits) - 1)  # the word's bits, unsigned
    used_in_last = word_bits - spare
    if (last >> used_in_last).any():
        raise ValueError(
            f"{where}: '{name}' has non-zero padding bits (the last {spare} bits of its last word); a packer writes "
            "zeros there, so the tensor is corrupt or was edited"
        )


def check_scheme_tensors(
    where: str, scheme: str, has: dict[str, bool], expected: dict[str, bool], source: str = "the config"
) -> None:
    """The tensors a file stores for a layer (``has``: name -> present) must be those its scheme implies.

    ``expected``: name -> whether ``scheme`` needs it. A mismatch is a contradiction between the checkpoint's
    config and its tensors (transformers would silently drop the unexpected tensor or leave the missing one
    uninitialised), e.g. ``symmetric: true`` with stored ``weight_zero_point``.
    """
    for name, needed in expected.items():
        present = has.get(name, False)
        if needed and not present:
            raise ValueError(
                f"{where}: {source} says {scheme}, which needs '{name}', but the checkpoint has no such tensor"
            )
        if present and not needed:
            raise ValueError(
                f"{where}: {source} says {scheme}, but the checkpoint stores '{name}' (data of another scheme); "
                "the config and the tensors contradict each other"
            )


def check_quantized_layer(
    where: str,
    bits: int,
    out_features: int,
    in_features: int,
    group_size: Optional[int],
    scale: torch.Tensor,
    zero_point: Optional[torch.Tensor] = None,
    codes: Optional[torch.Tensor] = None,
    sign: Literal["positive", "any"] = "positive",
    signed_grid: bool = False,
) -> None:
    """Every check of one quantized linear layer ``W = scale * (codes - zero_point)``.

    ``scale`` and ``zero_point``: ``(out_features, n_groups)`` with ``n_groups = in_features / group_size`` (1 per
    channel); ``codes``: ``(out_features, in_features)`` integers. ``zero_point``/``codes`` may be omitted when the
    format cannot hold out-of-grid values (they are then checked by the caller, e.g. :func:`check_padding_bits`).
    ``signed_grid``: codes and zero-points are signed (compressed-tensors' convention) rather than unsigned.
    """
    if group_size is not None and (group_size <= 0 or in_features % group_size):
        raise ValueError(f"{where}: group_size={group_size} does not divide in_features={in_features}")
    n_groups = 1 if group_size is None else in_features // group_size
    groups = f"{out_features} output channels x {n_groups} group(s) of {in_features // n_groups} inputs"
    check_dtype(scale, "float", where, "scale")
    check_shape(scale, (out_features, n_groups), where, "scale", groups)
    check_scales(scale, where, "scale", sign)
    if zero_point is not None:
        check_shape(zero_point, (out_features, n_groups), where, "zero_point", groups)
        check_grid(zero_point, bits, where, "zero_point", signed_grid)
    if codes is not None:
        check_dtype(codes, "int", where, "codes")
        check_shape(codes, (out_features, in_features), where, "codes")
        check_grid(codes, bits, where, "codes", signed_grid)
