"""compressed-tensors ``pack-quantized`` export: the checkpoint format vLLM serves and transformers loads natively.

Each PEQA layer becomes the tensors compressed-tensors' ``PackedQuantizationCompressor`` writes for an asymmetric
integer weight (``weight_packed``, ``weight_scale``, ``weight_zero_point``, ``weight_shape``), packed with the
library's own ``pack_to_int32``. compressed-tensors stores codes and zero-points *signed*
(``q - 2^(b-1)``, ``z - 2^(b-1)``), which is the same weight ``s * (q - z)``; nothing is re-quantized. The
``quantization_config`` in ``config.json`` is a ``QuantizationConfig`` written by the library's ``ModelCompressor``.

The zero-point layout (``zero_point_layout``) needs a choice, because the pinned readers disagree:

- ``"packed"``: ``pack_to_int32(z, bits, packed_dim=0)`` as it is, shape ``(ceil(out*bits/32), n_groups)`` — what
  ``PackedQuantizationCompressor.compress`` writes and what vLLM's ``CompressedTensorsWNA16`` allocates. transformers
  5.23 with compressed-tensors 0.20 cannot load it: its compressed-mode loader allocates the zero-point unpacked,
  ``(out, n_groups)``, and stops on the size mismatch (llm-compressor issue #1618).
- ``"transformers"`` (default): the same int32 words zero-padded to ``(out, n_groups)`` rows. That is the shape the
  transformers loader allocates, and compressed-tensors' decompressor (``unpack_from_int32`` on the packed words)
  reads only the first ``ceil(out*bits/32)`` rows, so plain ``AutoModelForCausalLM.from_pretrained`` reproduces the
  weights exactly. vLLM refuses this shape: export with ``"packed"`` for vLLM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from .._common import ExportModel, QuantWeight

FORMAT = "compressed-tensors"


def _import():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError as err:  # pragma: no cover - the [export] extra installs it
        raise ImportError(
            "format='compressed-tensors' needs `pip install compressed-tensors` (peqa-peft[export])"
        ) from err
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.pack_quantized import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    return ModelCompressor, pack_to_int32, QuantizationArgs, QuantizationConfig, QuantizationScheme


ZERO_POINT_LAYOUTS = ("transformers", "packed")


def validate(model: ExportModel, scale_dtype: Optional[torch.dtype] = None, zero_point_layout: str = "transformers"):
    """Every PEQA bit width (2..8) and group size is representable; only fractional zero-points are not."""
    if zero_point_layout not in ZERO_POINT_LAYOUTS:
        raise ValueError(f"zero_point_layout must be one of {ZERO_POINT_LAYOUTS}, got '{zero_point_layout}'")
    for layer in model.layers.values():
        layer.integer_zero(FORMAT)


def quantization_config(model: ExportModel):
    """The ``QuantizationConfig``: one asymmetric integer weight-only scheme for every ``Linear`` PEQA quantized."""
    _, _, QuantizationArgs, QuantizationConfig, QuantizationScheme = _import()
    group_size = model.group_size
    args = QuantizationArgs(
        num_bits=model.bits,
        type="int",
        symmetric=False,
        strategy="group" if group_size else "channel",
        group_size=group_size,
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    return QuantizationConfig(
        config_groups={"group_0": scheme},
        format="pack-quantized",
        quantization_status="compressed",
        ignore=sorted(model.float_linears),
    )


def layer_tensors(
    layer: QuantWeight, scale_dtype: torch.dtype, zero_point_layout: str = "transformers"
) -> dict[str, torch.Tensor]:
    """The compressed tensors of one layer, keyed by their name inside the module."""
    _, pack_to_int32, *_ = _import()
    offset = 1 << (layer.bits - 1)
    codes = (layer.codes.to(torch.int16) - offset).to(torch.int8)
    zero = (layer.integer_zero(FORMAT) - offset).to(torch.int8)
    tensors = {
        "weight_packed": pack_to_int32(codes, layer.bits),
        "weight_scale": layer.scale.to(scale_dtype),
        "weight_zero_point": pack_to_int32(zero, layer.bits, packed_dim=0).contiguous(),
        "weight_shape": torch.tensor([layer.out_features, layer.in_features]),
    }
    if zero_point_layout == "transformers":
        tensors["weight_zero_point"] = _pad_rows(tensors["weight_zero_point"], layer.out_features)
    if layer.bias is not None:
        tensors["bias"] = layer.bias
    return tensors


def write(
    model: ExportModel,
    out_dir: Path,
    tokenizer=None,
    scale_dtype: Optional[torch.dtype] = None,
    zero_point_layout: str = "transformers",
) -> None:
    """Write ``model.safetensors`` and ``config.json`` (with ``quantization_config``) into ``out_dir``.

    ``scale_dtype`` defaults to the model's dtype (the dtype transformers loads the scales into); PEQA's scales are
    float32, so an fp32 model is exported bit-exactly and a bf16/fp16 one rounds ``s`` once to that dtype.
    """
    ModelCompressor, *_ = _import()
    validate(model, scale_dtype, zero_point_layout)
    scale_dtype = scale_dtype or _model_dtype(model)
    tensors = {name: t.contiguous() for name, t in model.tensors.items()}
    for name, layer in model.layers.items():
        tensors.update({f"{name}.{key}": t for key, t in layer_tensors(layer, scale_dtype, zero_point_layout).items()})
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(out_dir)
    ModelCompressor(quantization_config=quantization_config(model)).update_config(str(out_dir))


def _model_dtype(model: ExportModel) -> torch.dtype:
    floats = [t.dtype for t in model.tensors.values() if t.is_floating_point()]
    return floats[0] if floats else torch.float32


def _pad_rows(packed: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero-pad packed zero-point words to ``rows`` rows (the ``"transformers"`` layout, see the module docstring)."""
    return torch.nn.functional.pad(packed, (0, 0, 0, rows - packed.shape[0])).contiguous()
