"""GPTQ-layout export (asymmetric, no act-order): ``qweight`` / ``qzeros`` / ``scales`` / ``g_idx`` per layer.

The layout is the one AutoGPTQ introduced and GPTQModel and transformers (through optimum + GPTQModel) read:

- ``qweight``: int32 ``(in_features * bits / 32, out_features)``, the codes of consecutive *input* rows packed
  LSB-first into each word (2/4/8 bits: ``32/bits`` codes per word; 3 bits: 32 codes in 3 words, codes 10 and 21
  straddling word boundaries);
- ``qzeros``: int32 ``(n_groups, out_features * bits / 32)``, the zero-points packed the same way along outputs;
- ``scales``: fp16 ``(n_groups, out_features)``; ``g_idx``: int32 ``(in_features,)`` = input index // group size;
- ``checkpoint_format``: ``"gptq_v2"`` (default) stores ``z`` in ``qzeros``; ``"gptq"`` (v1) stores ``z - 1``, the
  historic AutoGPTQ offset that v1 kernels add back, so a zero-point of 0 has no v1 encoding (refused). Current
  GPTQModel (7.x) reads v2, and refuses *asymmetric* v1 files unless GPTQModel itself wrote them (old AutoGPTQ
  asymmetric files had broken zero-points); v1 is for older v1-only readers (AutoGPTQ, exllama, vLLM's ``gptq``).

``config.json`` gets ``quantization_config`` and ``quantize_config.json`` the same dict, as GPTQModel writes them.
Only PEQA's integer codes and zero-points are written; scales are rounded once to fp16 (the GPTQ kernels' dtype).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from .._common import ExportModel, QuantWeight

FORMAT = "GPTQ"
BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


def _packing_unit(bits: int) -> int:
    """Rows (or columns) packed together: ``32/bits`` codes per word, or 32 codes in 3 words for 3 bits."""
    return 32 if bits == 3 else 32 // bits


def validate(model: ExportModel, checkpoint_format: str = "gptq_v2", **_write_only) -> None:
    """GPTQ holds 2/3/4/8-bit integer codes with integer zero-points and dimensions that fill whole int32 words."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got '{checkpoint_format}'")
    for layer in model.layers.values():
        if layer.bits not in BITS:
            raise ValueError(f"layer '{layer.name}' has {layer.bits}-bit codes; the GPTQ format stores {BITS} bits")
        unit = _packing_unit(layer.bits)
        for dim, size in (("in_features", layer.in_features), ("out_features", layer.out_features)):
            if size % unit:
                raise ValueError(
                    f"layer '{layer.name}': {dim}={size} is not a multiple of {unit}, so {layer.bits}-bit GPTQ "
                    "packing cannot hold it"
                )
        zero = layer.integer_zero(FORMAT)
        if checkpoint_format == "gptq" and int(zero.min()) == 0:
            raise ValueError(
                f"layer '{layer.name}' has a zero-point of 0, which the v1 GPTQ format (it stores z - 1) cannot "
                "encode; export with checkpoint_format='gptq_v2' (GPTQModel reads it)"
            )


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``values`` (integers in ``[0, 2^bits)``, shape ``(rows, cols)``) along rows into int32 words.

    Returns ``(rows * bits / 32, cols)``: the GPTQ ``qweight`` layout for ``values = codes.T``; ``qzeros`` is
    ``pack_rows(zeros.T, bits).T``.
    """
    v = values.to(torch.int64)
    rows, cols = v.shape
    unit = _packing_unit(bits)
    v = v.view(rows // unit, unit, cols)
    # place each code at bit offset bits * k of a (bits * 32)-bit stream per group of 32 rows, as 3-bit packing does
    # explicitly; for 2/4/8 bits this is the same as packing 32/bits codes per word
    words_per_unit = unit * bits // 32
    out = torch.zeros(rows // unit, words_per_unit, cols, dtype=torch.int64)
    for k in range(unit):
        start = bits * k
        word, shift = divmod(start, 32)
        out[:, word] |= (v[:, k] << shift) & 0xFFFFFFFF
        spill = shift + bits - 32
        if spill > 0:  # the code straddles two words: its high bits start the next one
            out[:, word + 1] |= v[:, k] >> (bits - spill)
    return _to_int32(out.view(-1, cols))


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as int32 (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def layer_tensors(layer: QuantWeight, checkpoint_format: str = "gptq_v2") -> dict[str, torch.Tensor]:
    """The GPTQ tensors of one layer, keyed by their name inside the module."""
    zero = layer.integer_zero(FORMAT).to(torch.int64)
    if checkpoint_format == "gptq":
        zero = zero - 1  # v1 stores z - 1 (validated: z >= 1)
    n_groups = layer.scale.shape[1]
    tensors = {
        "qweight": pack_rows(layer.codes.t(), layer.bits),
        "qzeros": _pack_cols(zero.t(), layer.bits),
        "scales": layer.scale.t().to(torch.float16).contiguous(),
        "g_idx": (torch.arange(layer.in_features) // (layer.in_features // n_groups)).to(torch.int32),
    }
    if layer.bias is not None:
        tensors["bias"] = layer.bias.to(torch.float16)
    return tensors


def _pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``(rows, cols)`` along columns: ``(rows, cols * bits / 32)`` (the ``qzeros`` layout)."""
    return pack_rows(values.t().contiguous(), bits).t().contiguous()


def quantize_config(model: ExportModel, checkpoint_format: str = "gptq_v2") -> dict:
    """``quantize_config.json`` / ``config.json["quantization_config"]`` as GPTQModel writes them."""
    from ...._version import __version__

    skipped = [name for name in model.float_linears if name != "lm_head"]
    config = {
        "quant_method": "gptq",
        "bits": model.bits,
        "group_size": model.group_size or -1,
        "desc_act": False,
        "sym": False,
        "lm_head": False,
        "true_sequential": True,
        "checkpoint_format": checkpoint_format,
        "meta": {"quantizer": [f"peqa_peft:{__version__}"]},
    }
    if skipped:
        # GPTQModel quantizes every Linear of a block unless a negative "dynamic" rule excludes it
        config["dynamic"] = {f"-:^{re.escape(name)}$": {} for name in skipped}
    return config


def write(model: ExportModel, out_dir: Path, tokenizer=None, checkpoint_format: str = "gptq_v2") -> None:
    """Write ``model.safetensors``, ``config.json`` (with ``quantization_config``) and ``quantize_config.json``."""
    validate(model, checkpoint_format)
    tensors = {name: t.contiguous() for name, t in model.tensors.items()}
    for name, layer in model.layers.items():
        tensors.update({f"{name}.{key}": t for key, t in layer_tensors(layer, checkpoint_format).items()})
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    qconfig = quantize_config(model, checkpoint_format)
    model.config.save_pretrained(out_dir)
    config_path = out_dir / "config.json"
    data = json.loads(config_path.read_text())
    data["quantization_config"] = qconfig
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    (out_dir / "quantize_config.json").write_text(json.dumps(qconfig, indent=2) + "\n")
