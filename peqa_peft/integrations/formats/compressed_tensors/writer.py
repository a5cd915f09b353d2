"""compressed-tensors ``pack-quantized`` export: one checkpoint that vLLM serves and transformers loads.

Each PEQA layer becomes the tensors compressed-tensors' ``PackedQuantizationCompressor`` writes for an asymmetric
integer weight (``weight_packed``, ``weight_scale``, ``weight_zero_point``, ``weight_shape``), packed with the
library's own ``pack_to_int32``. compressed-tensors stores codes and zero-points *signed*
(``q - 2^(b-1)``, ``z - 2^(b-1)``), which is the same weight ``s * (q - z)``; nothing is re-quantized. The
``quantization_config`` in ``config.json`` is a ``QuantizationConfig`` written by the library's ``ModelCompressor``.

The tensors are the canonical layout — what llm-compressor writes (its compressor is the one above) and what vLLM's
``CompressedTensorsWNA16`` allocates: zero-points packed along the output dimension, ``(ceil(out*bits/32), groups)``.
transformers 5.25 with compressed-tensors 0.20 cannot take that shape on its *compressed* loading route (the
zero-point placeholder is built unpacked, ``(out, groups)``, and loading stops on the size mismatch; llm-compressor
issue #1618; transformers 5.19 with compressed-tensors 0.17 loads it), but its ``dequantize`` route decompresses
each layer's checkpoint tensors with the library's own ``decompress`` and reads the packed shape exactly. So
``quantization_config`` also carries ``"dequantize": true``, transformers' documented loading attribute
(``CompressedTensorsConfig(dequantize=True)``, in transformers 5.19 and 5.25 alike): plain
``AutoModelForCausalLM.from_pretrained(dir)`` then loads the weights ``s * (q - z)`` in the model dtype (the compressed
route would decompress them on the first forward pass anyway). vLLM reads ``quantization_config`` key by key and
ignores that one. (An earlier ``zero_point_layout="transformers"`` option padded the zero-points to ``(out, groups)``
for the compressed route; vLLM refused it, and the ``dequantize`` route made it unnecessary, so it is gone.)

``target="vllm-cpu"`` writes the same file but first refuses, naming the layer, what vLLM's CPU kernel cannot serve
(:func:`vllm_cpu_problems`). Without it nothing engine-specific is checked: transformers loads every PEQA bit width
(2..8) and group size.
"""

from __future__ import annotations

import json
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


TARGETS = ("any", "vllm-cpu")

# vLLM fuses these projections into one layer (its Llama-family ``packed_modules_mapping``); it refuses a fused layer
# whose shards are not all quantized or all float ("Detected some but not all shards of ... are quantized").
_VLLM_FUSED_SHARDS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def validate(model: ExportModel, scale_dtype: Optional[torch.dtype] = None, target: str = "any") -> None:
    """Every PEQA bit width (2..8) and group size is representable; only fractional zero-points are not.

    ``target="vllm-cpu"`` additionally refuses what vLLM cannot serve on CPU (see :func:`vllm_cpu_problems`).
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got '{target}'")
    for layer in model.layers.values():
        layer.integer_zero(FORMAT)
    if target == "vllm-cpu":
        problems = vllm_cpu_problems(model)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ValueError(
                f"target='vllm-cpu': {problems[0]}{more}. The same export without target='vllm-cpu' still loads in "
                "transformers"
            )


def vllm_cpu_problems(model: ExportModel) -> list[str]:
    """What vLLM 0.32 on CPU cannot serve, one message per layer (empty: servable).

    vLLM maps an asymmetric ``pack-quantized`` layer to ``CompressedTensorsWNA16`` with weight type ``uint<bits>``
    (2..8 bits accepted there) and then needs a kernel whose ``can_implement`` accepts the layer. On x86 the only
    candidate is ``CPUWNA16LinearKernel`` (``Dynamic4bitLinearKernel`` takes signed ``int4`` only, Zentorch needs an
    AMD Zen CPU), whose checks are: weight type ``uint4`` or ``uint4b8`` (so 4 bits), group size per channel or even,
    input and output sizes multiples of 32. Its GEMM runs in fp16/bf16 only (``cpu_gemm_wna16`` has no fp32 path):
    that is the serving dtype, chosen at load time (vLLM's ``dtype="auto"`` serves an fp32 checkpoint in bf16), so it
    is not checked here. The sizes are checked per layer, which is what the kernel sees unless vLLM fuses the layer
    with others (then it sees the sum; per layer is the safe side). Fused projections must agree on being quantized.
    """
    problems = []
    for name, layer in model.layers.items():
        if layer.bits != 4:
            problems.append(f"layer '{name}' is {layer.bits}-bit; vLLM's CPU kernel (CPUWNA16) serves 4-bit only")
        for what, size in (("input", layer.in_features), ("output", layer.out_features)):
            if size % 32:
                problems.append(
                    f"layer '{name}' has {what} size {size}; vLLM's CPU kernel (CPUWNA16) needs multiples of 32"
                )
        if layer.group_size is not None and layer.group_size % 2:
            problems.append(
                f"layer '{name}' has group size {layer.group_size}; vLLM's CPU kernel (CPUWNA16) needs an even one"
            )
    float_linears = set(model.float_linears)
    reported = set()
    for name in model.layers:
        parent, _, leaf = name.rpartition(".")
        for shards in _VLLM_FUSED_SHARDS:
            siblings = [f"{parent}.{shard}" if parent else shard for shard in shards]
            float_ones = [sibling for sibling in siblings if sibling in float_linears]
            if leaf in shards and float_ones and (parent, shards) not in reported:
                reported.add((parent, shards))
                problems.append(
                    f"vLLM fuses {'/'.join(shards)} into one layer and needs all of them quantized or none: "
                    f"'{name}' is quantized, '{float_ones[0]}' is not"
                )
    return problems


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


def layer_tensors(layer: QuantWeight, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The compressed tensors of one layer, keyed by their name inside the module (the canonical packed layout)."""
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
    if layer.bias is not None:
        tensors["bias"] = layer.bias
    return tensors


# transformers' loading attribute that makes plain from_pretrained read the packed zero-points (module docstring)
DEQUANTIZE_KEY = "dequantize"


def write(
    model: ExportModel,
    out_dir: Path,
    tokenizer=None,
    scale_dtype: Optional[torch.dtype] = None,
    target: str = "any",
) -> None:
    """Write ``model.safetensors`` and ``config.json`` (with ``quantization_config``) into ``out_dir``.

    ``scale_dtype`` defaults to the model's dtype (the dtype transformers loads the scales into); PEQA's scales are
    float32, so an fp32 model is exported bit-exactly and a bf16/fp16 one rounds ``s`` once to that dtype (vLLM
    rounds fp32 scales to its serving dtype when it loads them).
    """
    ModelCompressor, *_ = _import()
    validate(model, scale_dtype, target)
    scale_dtype = scale_dtype or _model_dtype(model)
    tensors = {name: t.contiguous() for name, t in model.tensors.items()}
    for name, layer in model.layers.items():
        tensors.update({f"{name}.{key}": t for key, t in layer_tensors(layer, scale_dtype).items()})
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(out_dir)
    ModelCompressor(quantization_config=quantization_config(model)).update_config(str(out_dir))
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"][DEQUANTIZE_KEY] = True
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _model_dtype(model: ExportModel) -> torch.dtype:
    floats = [t.dtype for t in model.tensors.values() if t.is_floating_point()]
    return floats[0] if floats else torch.float32
