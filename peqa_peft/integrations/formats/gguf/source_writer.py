"""Write a PEQA-tuned model that was loaded from a GGUF file (:func:`~.reader.load_gguf`) back into that file's format.

``peqa_peft.export(model, dir, format="gguf")`` lands here when the model has a ``peqa_gguf_source``; it writes
``dir/model.gguf``, a copy of the SOURCE file in which

- every metadata key (architecture hyper-parameters, tokenizer, chat template, ...) and every tensor that PEQA did
  not change is copied byte for byte (an untuned export has exactly the source's tensors);
- each tuned linear layer (its merged scales ``s0 + delta_s``, and zero-points) is written in its ORIGINAL type by
  ``codec.encode`` when that type holds the tuned values exactly: always for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 (fp16 ``d``
  and ``m``; the only rounding is of the tuned scales to fp16, as the format stores them);
- K-quant layers (Q2_K ... Q6_K), whose group scales are a super-block fp16 ``d`` times small integer sub-scales,
  rarely fit after tuning. ``k_quants="exact"`` (default) writes such a layer as Q4_1 / Q5_1 blocks when its groups
  are 32 wide (Q4_K, Q5_K: the same codes, fp16 scale and min per 32 weights; about 11% / 7% larger than the K
  block), else (Q2_K, Q3_K, Q6_K: groups of 16) as F16 weights: nothing is lost beyond fp16 rounding.
  ``k_quants="requantize"`` keeps the type and re-fits ``d``/``dmin`` and the sub-scales to the tuned values
  (``codec.encode_requantized``); the relative weight error it introduces is reported per layer;
- a layer whose source was float (F16/F32/BF16) or a type PEQA could not adopt, and which PEQA quantized and tuned,
  is written as its dequantized tuned weight in the source's float type (F16 when the source was not a float type).

Anything else that differs from the source (a trained embedding, ``modules_to_save``, another adapter type) is
refused before anything is written: this writer only knows how to write PEQA's tuned scales.
A summary (``gguf_export.json`` beside the file) lists how every tensor was written.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ....core import QuantLinear, unpack_bits
from .reader import GGUFSource, GGUFTensorRef, gguf_source

GGUF_FILE = "model.gguf"
SUMMARY_FILE = "gguf_export.json"
K_QUANT_MODES = ("exact", "requantize")
_FLOAT_TYPES = {"F32": np.float32, "F16": np.float16}


def _base_model(model: nn.Module) -> nn.Module:
    inner = getattr(model, "get_base_model", None)
    return inner() if callable(inner) else model


def _is_peqa_layer(module: nn.Module) -> bool:
    # tuners.peqa.layer.PeqaLayer, duck-typed: formats sit below the tuners (as formats/_common.py does)
    return isinstance(module, BaseTunerLayer) and callable(getattr(module, "merged_qparams", None))


def quantized_layers(model: nn.Module) -> dict[str, tuple[QuantLinear, torch.Tensor, torch.Tensor]]:
    """``{module name: (QuantLinear base, merged scale, merged zero)}`` of the transformers model under ``model``.

    Refuses adapter layers other than PEQA's and ``modules_to_save`` (this writer cannot write their changes).
    """
    hf = _base_model(model)
    out = {}
    for name, module in hf.named_modules():
        if _is_peqa_layer(module):
            scale, zero = module.merged_qparams()
            out[name] = (module.get_base_layer(), scale.detach().cpu(), zero.detach().cpu())
        elif isinstance(module, QuantLinear) and not name.endswith(".base_layer"):
            out[name] = (module, module.scale.detach().cpu(), module.zero_point.detach().cpu())
        elif isinstance(module, BaseTunerLayer) or type(module).__name__ == "ModulesToSaveWrapper":
            raise ValueError(
                f"module '{name}' is a {type(module).__name__}; the GGUF export of a model loaded from GGUF writes "
                "PEQA's tuned scales into the source file and cannot write other trained modules (modules_to_save, "
                "other adapters). Merge them into the base first or export another format."
            )
    return out


def _codes(base: QuantLinear) -> torch.Tensor:
    return unpack_bits(base.qweight.cpu(), base.bits, base.out_features * base.in_features).view(
        base.out_features, base.in_features
    )


def _file_order(perm: Optional[tuple[int, ...]], *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Rows back in the file's order (model row i is file row perm[i])."""
    if perm is None:
        return list(tensors)
    inverse = torch.empty(len(perm), dtype=torch.long)
    inverse[torch.tensor(perm)] = torch.arange(len(perm))
    return [t[inverse] for t in tensors]


def _exact_fallback(bits: int, group_size: Optional[int], in_features: int) -> str:
    """The smallest type holding ``scale * (codes - zero)`` up to fp16 rounding of scale/min: Q4_1, Q5_1 or F16."""
    group = group_size or in_features
    if group % 32 == 0 and in_features % 32 == 0:
        if bits <= 4:
            return "Q4_1"
        if bits == 5:
            return "Q5_1"
    return "F16"


def _dequantized(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> np.ndarray:
    rows, cols = codes.shape
    group = cols // scale.shape[1]
    q = codes.float().view(rows, scale.shape[1], group)
    return ((q - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)).reshape(rows, cols).numpy()


def _float_blocks(type_name: str, weight: np.ndarray) -> tuple[np.ndarray, str]:
    """``weight`` stored as ``type_name`` if that is a float type, else as F16."""
    import gguf

    if type_name in _FLOAT_TYPES:
        return weight.astype(_FLOAT_TYPES[type_name]), type_name
    if type_name == "BF16":
        return gguf.quants.quantize(weight.astype(np.float32), gguf.GGMLQuantizationType.BF16), "BF16"
    return weight.astype(np.float16), "F16"


def _encode(codec, type_name: str, codes, scale, zero) -> Optional[np.ndarray]:
    try:
        return codec.encode(type_name, codes, scale, zero)
    except ValueError:
        return None  # e.g. a zero-point outside the type's range after train_zero_point: use the fallback


def _layer_blocks(
    codec, ref: GGUFTensorRef, raw: np.ndarray, base: QuantLinear, scale, zero, k_quants: str, record: dict
) -> tuple[Optional[np.ndarray], str]:
    """The bytes and type to write for one PEQA layer; ``(None, type)`` means: copy the source bytes."""
    codes, scale, zero = _file_order(ref.row_permutation, _codes(base), scale.float(), zero)
    if ref.adopted:
        c0, s0, z0 = codec.decode(ref.type_name, raw, base.in_features)
        if not torch.equal(c0, codes):
            raise ValueError(f"layer '{ref.hf_name}': its codes are not the source file's (was the base replaced?)")
        if torch.equal(s0, scale) and torch.equal(z0.float(), zero.float()):
            record["copied"] += 1
            return None, ref.type_name  # untuned: the source bytes, exactly
        blocks = _encode(codec, ref.type_name, codes, scale, zero)
        if blocks is not None:
            record["encoded"][ref.type_name] = record["encoded"].get(ref.type_name, 0) + 1
            return blocks, ref.type_name
        if k_quants == "requantize" and codec.GRIDS[ref.type_name].block_size == codec.QK_K:
            try:
                blocks, error = codec.encode_requantized(ref.type_name, codes, scale, zero)
            except ValueError:
                blocks = None
            if blocks is not None:
                record["requantized"][ref.gguf_name] = {"type": ref.type_name, "relative_weight_error": float(error)}
                return blocks, ref.type_name
    if not ref.adopted:
        # a float (or non-adoptable) source layer that PEQA quantized: its tuned weight in the source's float type
        blocks, target = _float_blocks(ref.type_name, _dequantized(codes, scale, zero))
    else:
        # the source type cannot hold the tuned values: the smallest type that does (up to fp16 rounding)
        target = _exact_fallback(base.bits, base.group_size, base.in_features)
        blocks = _encode(codec, target, codes, scale, zero) if target != "F16" else None
        if blocks is None:
            blocks, target = _float_blocks("F16", _dequantized(codes, scale, zero))
    if target != ref.type_name:
        record["changed_type"][ref.gguf_name] = {"from": ref.type_name, "to": target}
    else:
        record["encoded"][target] = record["encoded"].get(target, 0) + 1
    return blocks, target


def _current_tensor(hf: nn.Module, name: str) -> Optional[torch.Tensor]:
    module_name, _, attr = name.rpartition(".")
    module = hf.get_submodule(module_name) if module_name else hf
    if _is_peqa_layer(module):
        module = module.get_base_layer()
    return getattr(module, attr, None)


def _check_unchanged(source: GGUFSource, hf: nn.Module, ref: GGUFTensorRef, tensor, processor, mapping) -> None:
    """Refuse to copy a float tensor's source bytes when the model's value differs from what the file gives."""
    import gguf

    current = _current_tensor(hf, ref.hf_name)
    if current is None:
        raise ValueError(f"tensor '{ref.gguf_name}' maps to '{ref.hf_name}', which the model no longer has")
    weights = gguf.dequantize(tensor.data, tensor.tensor_type)
    result = processor.process(weights=weights, name=tensor.name, tensor_key_mapping=mapping, parsed_parameters={})
    expected = torch.from_numpy(np.copy(result.weights)).to(source.dtype)
    if tuple(expected.shape) != tuple(current.shape) or not torch.equal(
        expected, current.detach().cpu().to(expected.dtype)
    ):
        raise ValueError(
            f"tensor '{ref.hf_name}' ({ref.gguf_name}) differs from the source file; the GGUF export of a model "
            "loaded from GGUF copies every non-PEQA tensor from the source, so it cannot write a trained embedding, "
            "norm or head. Freeze them, or export another format."
        )


def validate(model: nn.Module, k_quants: str = "exact", check_unchanged: bool = True, **unknown: Any) -> GGUFSource:
    """Check options and that the model can be written into its source file's format; returns the source."""
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(sorted(unknown))} for the GGUF export of a model loaded from GGUF "
            "(it accepts k_quants='exact'|'requantize' and check_unchanged)"
        )
    if k_quants not in K_QUANT_MODES:
        raise ValueError(f"k_quants must be one of {K_QUANT_MODES}, got {k_quants!r}")
    source = gguf_source(model)
    if source is None:
        raise ValueError("the model was not loaded with peqa_peft.load_gguf (no peqa_gguf_source)")
    if not Path(source.path).is_file():
        raise FileNotFoundError(f"the model's source GGUF file '{source.path}' is gone; it is copied into the export")
    layers = quantized_layers(model)
    by_module = source.by_module()
    orphans = sorted(set(layers) - set(by_module))
    if orphans:
        raise ValueError(
            f"layer '{orphans[0]}' (and {len(orphans) - 1} more) is quantized but has no weight in the source GGUF "
            "file that the export could write it into"
        )
    return source


def write(
    model: nn.Module,
    out_dir: Path,
    k_quants: str = "exact",
    check_unchanged: bool = True,
    filename: str = GGUF_FILE,
) -> Path:
    """Write ``out_dir/filename`` (see the module docstring) and ``out_dir/gguf_export.json``; returns the file."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    from . import codec
    from .reader import _shared_reader

    source = validate(model, k_quants, check_unchanged)
    reader = source.reader()
    hf = _base_model(model)
    layers = quantized_layers(model)
    processor = source.processor()
    mapping = {}
    if check_unchanged:
        with _shared_reader(reader):
            mapping = get_gguf_hf_weights_map(hf, processor)
    record: dict[str, Any] = {"source": source.path, "k_quants": k_quants, "copied": 0, "encoded": {}}
    record.update(requantized={}, changed_type={})

    planned = []  # (tensor, ref, new blocks or None, type name)
    for tensor, ref in zip(reader.tensors, source.tensors):
        if tensor.name != ref.gguf_name:
            raise ValueError(f"the source file '{source.path}' changed since the model was loaded")
        module_name = ref.hf_name.removesuffix(".weight") if ref.linear else None
        if module_name in layers:
            base, scale, zero = layers[module_name]
            blocks, type_name = _layer_blocks(codec, ref, np.asarray(tensor.data), base, scale, zero, k_quants, record)
            planned.append((tensor, blocks, type_name))
            continue
        if check_unchanged and ref.hf_name is not None:
            _check_unchanged(source, hf, ref, tensor, processor, mapping)
        record["copied"] += 1
        planned.append((tensor, None, ref.type_name))

    path = Path(out_dir) / filename
    arch = str(reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    writer = gguf.GGUFWriter(str(path), arch=arch, endianess=reader.endianess)
    alignment = reader.fields.get(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    for field in reader.fields.values():  # as gguf-py's gguf_new_metadata.py copies them
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    for tensor, blocks, type_name in planned:
        data = tensor.data if blocks is None else blocks
        qtype = gguf.GGMLQuantizationType[type_name]
        writer.add_tensor_info(tensor.name, data.shape, data.dtype, data.nbytes, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor, blocks, _ in planned:
        writer.write_tensor_data(tensor.data if blocks is None else blocks, tensor_endianess=reader.endianess)
    writer.close()

    (Path(out_dir) / SUMMARY_FILE).write_text(json.dumps(record, indent=1) + "\n")
    if record["changed_type"]:
        changes: dict[str, int] = {}
        for change in record["changed_type"].values():
            key = f"{change['from']}->{change['to']}"
            changes[key] = changes.get(key, 0) + 1
        warnings.warn(
            f"GGUF export: {len(record['changed_type'])} tuned layer(s) written in another type because their "
            f"source type cannot hold the tuned scales exactly ({', '.join(f'{n} {k}' for k, n in changes.items())}"
            "); k_quants='requantize' keeps K-quant types at a measured error (see gguf_export.json)",
            stacklevel=3,
        )
    return path


__all__ = ["GGUF_FILE", "K_QUANT_MODES", "SUMMARY_FILE", "quantized_layers", "validate", "write"]
