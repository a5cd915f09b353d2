"""Read linear layers loaded from compressed-tensors checkpoints (what llm-compressor writes) into ``QuantLinear``.

transformers' compressed-tensors integration loads such a checkpoint, by default, *compressed*: each quantized
linear stays a ``torch.nn.Linear`` without a ``weight``, carrying the checkpoint's tensors (``weight_packed`` int32,
``weight_scale``, ``weight_zero_point``, ``weight_shape``) and a ``quantization_scheme``; a forward pre-hook on the
model decompresses everything to float on the first forward pass. This module reads those tensors with the
compressed-tensors library's own unpacking (``unpack_from_int32``), so the integers, scales and zero-points of the
checkpoint become PEQA's ``W0``, ``s0`` and ``z0`` exactly and no float weight is built.

compressed-tensors stores *signed* integers ``q`` in ``[-2^(b-1), 2^(b-1))`` and signed zero-points ``zp``
(``W = s * (q - zp)``; ``zp = 0`` for symmetric schemes). PEQA's grid is unsigned, so codes and zero-points move by
the same offset ``2^(b-1)``: ``W = s * ((q + 2^(b-1)) - (zp + 2^(b-1)))`` -- a symmetric checkpoint has
``z0 = 2^(b-1)``.

Supported: integer weight-only schemes with 2..8 bits, symmetric or asymmetric, per channel, per group or per
tensor (one scale for the tensor becomes the same scale on every output channel), stored pack-quantized or
naive/int-quantized, and layers that were already decompressed by a forward pass (their integers are recovered
exactly from the dequantized weight and checked). Refused with an error naming the layer and the scheme: float
schemes (fp8, nvfp4, mxfp4), activation quantization, block strategy, dynamic weight scales, activation-ordered groups
(``g_idx``).

``install_compat_fixes()`` (called when ``peqa_peft`` is imported) repairs a version-skew bug of compressed-tensors
0.20 with transformers 5.2x: when transformers builds the compressed module layout on the meta device, asymmetric
per-channel/per-group zero-points keep their *unpacked* shape ``(out, groups)``, while every checkpoint (any writer
version) stores them packed along the output dimension, ``(ceil(out * bits / 32), groups)`` int32, so the default
``from_pretrained`` refuses every asymmetric pack-quantized checkpoint ("size mismatch for weight_zero_point"). The
fix gives those placeholders the packed shape the checkpoint has; it is a no-op when the shapes already agree. The
same hook records, on each quantized layer, which of its tensors the checkpoint file stores, so that adoption can
refuse a config that contradicts its tensors (transformers reports a ``weight_zero_point`` of a ``symmetric: true``
scheme as UNEXPECTED and drops it, which would adopt asymmetric data as symmetric).

Before any layer is replaced, every adopted layer's stored tensors pass :func:`check_tensors` (finite positive scales,
dtypes, shapes, zero padding bits, zero-points in the grid: ``peqa_peft.integrations.validation``). PEFT glue
(checking a layer's grid against a ``PeqaConfig``) is in :mod:`peqa_peft.tuners.peqa.backends.compressed_tensors`.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import nn

from ....core import QuantLinear, validate_bits
from ... import validation
from ..quant_linear import expand_per_tensor, quant_linear_from_codes

_WEIGHT_STRATEGIES = ("channel", "group", "tensor")
_PACKED_ZERO_POINT_STRATEGIES = ("channel", "group")  # compressed-tensors packs zero-points only for these
_PLAIN_ACTORDER = (None, "weight", "static")  # orderings that leave the stored format unchanged
_FIX_MARKER = "_peqa_peft_zero_point_fix"
_RECORD = "_peqa_peft_checkpoint_tensors"  # (file, names of the layer's tensors in it), set while loading


def is_compressed_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer transformers loaded from a compressed-tensors checkpoint."""
    return isinstance(module, nn.Linear) and hasattr(module, "quantization_scheme")


def _value(x) -> object:
    """An enum member's value (compressed-tensors' strategies/types are ``str`` enums), else ``x``."""
    return getattr(x, "value", x)


def describe(module: nn.Module) -> str:
    """A short description of a layer's compressed-tensors scheme, for error messages."""
    scheme = module.quantization_scheme
    w = scheme.weights
    if w is None:
        return "activation-only quantization"
    kind = "symmetric" if w.symmetric else "asymmetric"
    group = f" group_size={w.group_size}" if w.group_size else ""
    acts = " with activation quantization" if scheme.input_activations or scheme.output_activations else ""
    return f"{_value(w.type)}{w.num_bits} {_value(w.strategy)}{group} {kind}{acts}"


def grid(module: nn.Module) -> tuple[int, int | None]:
    """``(bits, group_size)`` of the layer's scheme (``None``: not grouped)."""
    w = module.quantization_scheme.weights
    return w.num_bits, (w.group_size if _value(w.strategy) == "group" else None)


def check_scheme(module: nn.Module, key: str) -> None:
    """Refuse schemes PEQA cannot represent (float, activation-quantized, dynamic, reordered, not loaded)."""
    scheme = module.quantization_scheme
    w = scheme.weights
    what = f"layer '{key}' uses the compressed-tensors scheme '{describe(module)}'"
    if scheme.input_activations is not None or scheme.output_activations is not None:
        raise ValueError(f"{what}; PEQA adopts weight-only schemes (activations unquantized, e.g. W4A16)")
    if w is None or _value(w.type) != "int":
        raise ValueError(f"{what}; PEQA adopts integer weight schemes only (not fp8/nvfp4/mxfp4)")
    try:
        validate_bits(w.num_bits)
    except ValueError as err:
        raise ValueError(f"{what}; {err}") from None
    if _value(w.strategy) not in _WEIGHT_STRATEGIES:
        raise ValueError(f"{what}; supported strategies: {', '.join(_WEIGHT_STRATEGIES)}")
    if w.dynamic:
        raise ValueError(f"{what}; dynamic weight scales are not a stored grid PEQA could tune")
    if _value(getattr(w, "actorder", None)) not in _PLAIN_ACTORDER or _has_reordered_groups(module):
        raise ValueError(f"{what} with activation-ordered groups (g_idx); PEQA needs contiguous groups")
    if _value(w.strategy) == "group" and module.in_features % w.group_size:
        raise ValueError(f"{what}; group_size={w.group_size} does not divide in_features={module.in_features}")
    if _storage(module) == "meta":
        raise ValueError(f"{what}, but its tensors are not loaded (meta device); load the model onto a device first")


def check_tensors(module: nn.Module, key: str) -> None:
    """The stored tensors of a layer, with the checks saved adapters get (``peqa_peft.integrations.validation``).

    The scheme must agree with the tensors the checkpoint file stores (recorded while loading, see
    :func:`install_compat_fixes`: transformers drops a tensor the scheme has no place for, e.g. the zero-points of a
    checkpoint whose config says ``symmetric: true``, and leaves one the file lacks uninitialised); scales must be
    finite and positive; integers and zero-points of the right dtype and shape, inside the grid, with zero padding
    bits in packed words.
    """
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    w = module.quantization_scheme.weights
    bits, strategy = w.num_bits, _value(w.strategy)
    out_features, in_features = module.out_features, module.in_features
    record = getattr(module, _RECORD, None)
    where = f"{record[0]}: layer '{key}'" if record else f"layer '{key}'"
    if record:
        scheme = f"'symmetric: {str(bool(w.symmetric)).lower()}' ({describe(module)})"
        expected = {"weight_zero_point": not w.symmetric, "weight_scale": True}
        has = {name: name in record[1] for name in expected}
        validation.check_scheme_tensors(where, scheme, has, expected, "the checkpoint's quantization_config")
    n_groups = in_features // w.group_size if strategy == "group" else 1
    scale = module.weight_scale.detach()
    if strategy == "tensor":
        validation.check_shape(scale.reshape(-1), (1,), where, "weight_scale", "one scale per tensor")
    else:
        validation.check_shape(scale, (out_features, n_groups), where, "weight_scale", f"{strategy} strategy")
    validation.check_scales(scale, where, "weight_scale")
    storage = _storage(module)
    if storage == "packed":
        packed = module.weight_packed
        validation.check_dtype(packed, "int", where, "weight_packed")
        words = math.ceil(in_features * bits / 32)
        validation.check_shape(packed, (out_features, words), where, "weight_packed", f"{bits}-bit codes, int32 words")
        validation.check_padding_bits(packed, in_features * bits, where, "weight_packed", dim=1)
    elif storage == "int":
        validation.check_shape(module.weight, (out_features, in_features), where, "weight")
        validation.check_grid(module.weight, bits, where, "weight", signed=True)
    stored_shape = getattr(module, "weight_shape", None)
    if isinstance(stored_shape, torch.Tensor) and stored_shape.device.type != "meta":
        if stored_shape.tolist() != [out_features, in_features]:
            raise ValueError(
                f"{where}: 'weight_shape' says {stored_shape.tolist()}, the layer is {[out_features, in_features]}"
            )
    zp = getattr(module, "weight_zero_point", None)
    if w.symmetric or zp is None:
        return
    zp = zp.detach()
    if not zp.is_floating_point():  # float zero-points (some older writers) are checked to be integral below
        validation.check_dtype(zp, "int", where, "weight_zero_point")
    n_rows = 1 if strategy == "tensor" else out_features
    if strategy in _PACKED_ZERO_POINT_STRATEGIES and zp.dtype == torch.int32 and zp.shape[0] != out_features:
        if storage == "packed":
            rows = _packed_zero_point_rows(out_features, bits)
            validation.check_shape(zp, (rows, n_groups), where, "weight_zero_point", "packed along the outputs")
            validation.check_padding_bits(zp, out_features * bits, where, "weight_zero_point", dim=0)
            zp = unpack_from_int32(zp, bits, torch.Size((out_features, n_groups)), packed_dim=0)
    if strategy == "tensor":
        validation.check_shape(zp.reshape(-1), (1,), where, "weight_zero_point", "one zero-point per tensor")
    else:
        validation.check_shape(zp, (n_rows, n_groups), where, "weight_zero_point", f"{strategy} strategy")
    validation.check_grid(zp, bits, where, "weight_zero_point", signed=True)


def _has_reordered_groups(module: nn.Module) -> bool:
    """Whether the layer's groups are not contiguous column ranges (a non-trivial ``g_idx``)."""
    g_idx = getattr(module, "weight_g_idx", None)
    if g_idx is None:
        return False
    if g_idx.device.type == "meta":
        return True  # cannot be verified, so not assumed trivial
    if (g_idx < 0).all():  # compressed-tensors fills -1 for "no reordering"
        return False
    group_size = module.quantization_scheme.weights.group_size or module.in_features
    trivial = torch.arange(module.in_features, device=g_idx.device) // group_size
    return not torch.equal(g_idx.to(trivial.dtype), trivial)


def _storage(module: nn.Module) -> str:
    """How the layer holds its integers: 'packed', 'int' (one per element), 'dense' (decompressed) or 'meta'."""
    tensor = getattr(module, "weight_packed", None)
    kind = "packed"
    if tensor is None:
        tensor = module.weight
        kind = "dense" if tensor.is_floating_point() else "int"
    return "meta" if tensor.device.type == "meta" else kind


def _signed_zero_point(module: nn.Module, out_features: int, n_groups: int) -> torch.Tensor:
    """The checkpoint's signed zero-points as an int tensor ``(out, n_groups)`` (zeros when symmetric)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    w = module.quantization_scheme.weights
    zp = getattr(module, "weight_zero_point", None)
    if w.symmetric or zp is None:
        return torch.zeros(out_features, n_groups, dtype=torch.int16, device=module.weight_scale.device)
    packed = (
        _storage(module) == "packed"
        and _value(w.strategy) in _PACKED_ZERO_POINT_STRATEGIES
        and zp.dtype == torch.int32
        and zp.shape[0] != out_features
    )
    if packed:
        zp = unpack_from_int32(zp, w.num_bits, torch.Size((out_features, n_groups)), packed_dim=0)
    if _value(w.strategy) == "tensor":
        zp = expand_per_tensor(zp, out_features)
    return zp.reshape(out_features, n_groups).to(torch.int16)


@torch.no_grad()
def _signed_codes(module: nn.Module, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    """The signed integer codes ``(out, in)`` of the layer, read with compressed-tensors' own unpacking."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    bits = module.quantization_scheme.weights.num_bits
    shape = torch.Size((module.out_features, module.in_features))
    storage = _storage(module)
    if storage == "packed":
        return unpack_from_int32(module.weight_packed, bits, shape).to(torch.int16)
    if storage == "int":
        return module.weight.to(torch.int16)
    # Already decompressed (a forward pass ran, or transformers loaded it dense): W = s * (q - zp) rounded to the
    # weight's dtype, so q = round(W / s) + zp, and the grid must reproduce W up to that dtype's rounding.
    groups = scale.shape[1]
    w = module.weight.float().reshape(shape[0], groups, -1)
    q = torch.round(w / scale.float().unsqueeze(-1)) + zp.float().unsqueeze(-1)
    rtol = max(1e-3, 2 * torch.finfo(module.weight.dtype).eps)
    if not torch.allclose((q - zp.unsqueeze(-1)) * scale.float().unsqueeze(-1), w, rtol=rtol, atol=1e-6):
        raise ValueError("the decompressed weight is not on its stored grid (was it modified?)")
    return q.reshape(shape).to(torch.int16)


def to_quant_linear(module: nn.Module, key: str) -> QuantLinear:
    """The layer's integers, scales and zero-points as a ``QuantLinear`` (moved to PEQA's unsigned grid, exact)."""
    bits, group_size = grid(module)
    offset = 2 ** (bits - 1)
    scale = module.weight_scale.detach()
    if _value(module.quantization_scheme.weights.strategy) == "tensor":
        scale = expand_per_tensor(scale, module.out_features)
    scale = scale.reshape(module.out_features, -1)
    zp = _signed_zero_point(module, module.out_features, scale.shape[1])
    try:
        codes = _signed_codes(module, scale, zp) + offset
    except ValueError as err:
        raise ValueError(f"layer '{key}' ({describe(module)}): {err}") from None
    return quant_linear_from_codes(codes, scale, zp + offset, bits, group_size, module.bias, key)


# --- version-skew repair (see the module docstring) -----------------------------------------------------------------


def _packed_zero_point_rows(out_features: int, bits: int) -> int:
    """Rows of a zero-point packed along the output dimension by ``pack_to_int32(..., packed_dim=0)``."""
    return math.ceil(out_features * bits / 32)


def _stored_tensors(checkpoint_files) -> dict[str, tuple[str, dict[str, tuple[int, ...]]]]:
    """Module name -> (file, {tensor name: shape}) for every tensor of the checkpoint's safetensors files.

    Only the headers are read. Keys are split at their last dot (``model.layers.0.mlp.up_proj.weight_scale`` ->
    module ``model.layers.0.mlp.up_proj``, tensor ``weight_scale``).
    """
    from safetensors import safe_open

    stored: dict[str, tuple[str, dict[str, tuple[int, ...]]]] = {}
    for file in checkpoint_files or ():
        if not str(file).endswith(".safetensors"):
            continue
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                module, _, name = key.rpartition(".")
                stored.setdefault(module, (str(file), {}))[1][name] = tuple(f.get_slice(key).get_shape())
    return stored


def _stored_zero_point_rows(stored) -> dict[str, int]:
    """Rows of every ``*.weight_zero_point`` tensor in ``stored`` (see :func:`_stored_tensors`)."""
    return {m: names["weight_zero_point"][0] for m, (_, names) in stored.items() if "weight_zero_point" in names}


def _record_stored_tensors(model: nn.Module, stored) -> None:
    """Note on each quantized layer which of its tensors the checkpoint file holds (checked when it is adopted)."""
    for name, module in model.named_modules():
        if getattr(module, "quantization_scheme", None) is not None and name in stored:
            file, names = stored[name]
            setattr(module, _RECORD, (file, frozenset(names)))


def _pack_meta_zero_points(model: nn.Module, stored_rows: Optional[dict[str, int]] = None) -> int:
    """Give unpacked meta zero-point placeholders of pack-quantized layers their packed checkpoint shape.

    With ``stored_rows`` (module name -> rows in the checkpoint), only layers whose checkpoint really stores the
    packed shape are changed: a checkpoint written with unpacked ``(out, groups)`` zero-points (the layout
    ``peqa_peft.integrations.formats`` writes by default so that transformers without this fix loads it) keeps its
    placeholders.
    """
    fixed = 0
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        zp = getattr(module, "weight_zero_point", None)
        if scheme is None or zp is None or getattr(module, "weight_packed", None) is None or zp.device.type != "meta":
            continue
        w = scheme.weights
        if w is None or w.symmetric or _value(w.strategy) not in _PACKED_ZERO_POINT_STRATEGIES:
            continue
        rows = _packed_zero_point_rows(zp.shape[0], w.num_bits)
        if zp.shape[0] == rows or zp.shape[0] != module.out_features:
            continue
        if stored_rows is not None and stored_rows.get(name) != rows:
            continue
        module.weight_zero_point = nn.Parameter(
            torch.empty(rows, *zp.shape[1:], dtype=torch.int32, device="meta"), requires_grad=False
        )
        fixed += 1
    return fixed


def install_compat_fixes() -> bool:
    """Install the zero-point shape repair and the stored-tensor record on transformers' compressed-tensors quantizer
    (idempotent).

    Returns ``False`` when transformers or compressed-tensors is not installed (nothing to repair).
    """
    try:
        from transformers.quantizers.quantizer_compressed_tensors import CompressedTensorsHfQuantizer
    except ImportError:
        return False
    original = CompressedTensorsHfQuantizer._process_model_before_weight_loading
    if getattr(original, _FIX_MARKER, False):
        return True

    @functools.wraps(original)
    def _process_model_before_weight_loading(self, model, **kwargs):
        result = original(self, model, **kwargs)
        files = kwargs.get("checkpoint_files")
        stored = _stored_tensors(files) if files else None
        _pack_meta_zero_points(model, _stored_zero_point_rows(stored) if files else None)
        if stored:
            _record_stored_tensors(model, stored)
        return result

    setattr(_process_model_before_weight_loading, _FIX_MARKER, True)
    CompressedTensorsHfQuantizer._process_model_before_weight_loading = _process_model_before_weight_loading
    return True


__all__ = [
    "check_scheme",
    "check_tensors",
    "describe",
    "grid",
    "install_compat_fixes",
    "is_compressed_layer",
    "to_quant_linear",
]
