"""Load a GGUF file as a transformers model whose quantized linear layers keep the file's own codes and scales.

``load_gguf(path)`` returns a transformers ``PreTrainedModel`` in which every linear layer stored in a block type PEQA
can represent exactly (:data:`codec.ADOPTABLE`: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K ... Q6_K) is a
:class:`~peqa_peft.core.QuantLinear` holding the file's integer codes ``q``, scales ``s`` and zero-points ``z`` (so
``s * (q - z)`` is gguf-py's dequantization of the tensor), and everything else is what transformers' own GGUF
loader would give. ``get_peft_model(model, PeqaConfig(...))`` then adopts those layers through the ``quant_linear``
backend: PEQA tunes the file's scales, nothing is re-quantized.

Why a loader in the package and not ``from_pretrained(..., gguf_file=...)`` + ``get_peft_model``
-------------------------------------------------------------------------------------------------
transformers (5.25) loads Llama, Gemma 3 and most other GGUF architectures through its legacy path
(``modeling_gguf_pytorch_utils.load_gguf_checkpoint``), which runs ``gguf.dequantize`` on every tensor and hands the
loader plain float weights: by the time any quantizer or PEFT sees the model, the file's codes, scales and mins are
gone (re-deriving them from the floats is a lossy search, not a read). Its newer block-keeping path (``GgufLinear``,
``GgufHfQuantizer``) covers only qwen35/qwen35moe/lfm2 and needs a Hub kernel (``kernels``); without it, it too
dequantizes everything. A ``PeqaQuantizationConfig`` passed to ``from_pretrained`` is refused when a ``gguf_file`` is
given (the GGUF quantizer owns the load). So the codes have to be read from the file before transformers
dequantizes them, which is what this loader does; everything that is not an adopted linear weight still goes
through transformers' own code: its config and tokenizer conversion (``AutoConfig``/``AutoTokenizer`` with
``gguf_file=``), its GGUF -> transformers name map (``get_gguf_hf_weights_map``) and its per-architecture tensor
processors (e.g. Llama's q/k row permutation, Gemma's norm offset), applied to ``gguf.dequantize`` output exactly as
``load_gguf_checkpoint`` does. For adopted layers, the processor is probed with a row-index tensor: if it only
re-orders rows (Llama q/k), the same permutation is applied to the codes, scales and zero-points; any other change
(transposes, fused-qkv reshapes) keeps that layer float, with a warning.

Memory: the model is built on the meta device; adopted weights are read block by block from the memory-mapped file
into packed codes (no float copy of them ever exists), the other tensors are dequantized one at a time.

The model remembers where it came from: ``model.peqa_gguf_source`` (a :class:`GGUFSource`: file path, and for every
tensor its GGUF name, ggml type, the transformers name and any row permutation). The GGUF exporter
(``peqa_peft.export(model, dir, format="gguf")``) rewrites that source file with the tuned layers. The attribute is
set again whenever the base is loaded again (``load_gguf`` then ``PeftModel.from_pretrained(model, adapter)``), and
``config.name_or_path`` is the file path, so a saved adapter's ``base_model_name_or_path`` names the GGUF file.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from unittest import mock

import numpy as np
import torch
from torch import nn

from ....core import QuantLinear, pack_bits
from ... import validation

SOURCE_ATTRIBUTE = "peqa_gguf_source"


@dataclass(frozen=True)
class GGUFTensorRef:
    """One tensor of the source file and where it lives in the transformers model."""

    gguf_name: str  # e.g. "blk.0.attn_q.weight"
    type_name: str  # ggml type name, e.g. "Q4_1", "Q6_K", "F32"
    hf_name: Optional[str]  # transformers state-dict name, None when transformers does not use it
    adopted: bool = False  # loaded as a QuantLinear from the file's own blocks
    # model row i = file row row_permutation[i], for linear weights (None: same order, or not a linear weight)
    row_permutation: Optional[tuple[int, ...]] = None
    linear: bool = False  # the weight of an nn.Linear of the model (adopted or kept float)


@dataclass
class GGUFSource:
    """Where a model loaded by :func:`load_gguf` came from (``model.peqa_gguf_source``)."""

    path: str
    architecture: str  # GGUF general.architecture, e.g. "llama", "gemma3"
    tensors: list[GGUFTensorRef] = field(default_factory=list)
    dtype: torch.dtype = torch.float32  # the dtype load_gguf gave the float tensors
    processor_config: dict = field(default_factory=dict)  # what transformers' tensor processor was built with

    def reader(self):
        """A new gguf-py ``GGUFReader`` of the source file (memory-mapped), for the caller to drop when done. None is
        kept with the model: its parsed header (a Python object per vocabulary entry and merge) held ~150 MB for
        SmolLM2's 49k-token vocabulary, as much as the adopted 4-bit layers themselves."""
        import gguf

        return gguf.GGUFReader(self.path)

    def by_module(self) -> dict[str, GGUFTensorRef]:
        """Adopted and float linear weights by transformers module name (``"model.layers.0.self_attn.q_proj"``)."""
        return {t.hf_name.removesuffix(".weight"): t for t in self.tensors if t.linear}

    def processor(self):
        """transformers' tensor processor for this file's architecture (as ``load_gguf_checkpoint`` builds it)."""
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        return TENSOR_PROCESSORS.get(self.architecture, TensorProcessor)(config=self.processor_config)

    def types(self) -> dict[str, str]:
        """ggml type of every adopted layer, by module name."""
        return {name: t.type_name for name, t in self.by_module().items() if t.adopted}


def gguf_source(model: nn.Module) -> Optional[GGUFSource]:
    """The :class:`GGUFSource` of a model loaded by :func:`load_gguf` (also through a ``PeftModel``), else ``None``."""
    seen = set()
    while model is not None and id(model) not in seen:
        seen.add(id(model))
        source = getattr(model, SOURCE_ATTRIBUTE, None) if isinstance(model, nn.Module) else None
        if isinstance(source, GGUFSource):
            return source
        inner = getattr(model, "get_base_model", None)
        model = inner() if callable(inner) else None
    return None


@contextlib.contextmanager
def _shared_reader(reader) -> Iterator[None]:
    """Let transformers' GGUF config/tokenizer code reuse ``reader`` instead of parsing the file again.

    ``load_gguf_checkpoint`` imports ``gguf.GGUFReader`` when it runs and builds a new one each call; on a 262k-token
    vocabulary (Gemma 3) one parse takes about 30 s on 2 cores, and config + tokenizer would take two more.
    """
    import gguf

    filename = getattr(reader.data, "filename", None)
    path = os.path.realpath(filename) if filename else None
    original = gguf.GGUFReader

    def cached(p, *args, **kwargs):
        if path is not None and os.path.realpath(p) == path and not args and not kwargs:
            return reader
        return original(p, *args, **kwargs)

    # transformers' get_gguf_hf_weights_map recurses into every submodule and rebuilds gguf's tensor-name map at
    # each one (~400 times for a 30-layer Llama, most of the name-mapping time); the map only depends on its
    # arguments, so it is built once per (architecture, layer count) here.
    name_map = functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map)
    with mock.patch.object(gguf, "GGUFReader", cached), mock.patch.object(gguf, "get_tensor_name_map", name_map):
        yield


def _check_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file '{path}' does not exist")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"'{path}' is not a GGUF file (it does not start with the bytes 'GGUF')")
    return path


def load_gguf_config(path: str | os.PathLike, reader=None):
    """transformers' config for the GGUF file (``AutoConfig.from_pretrained(dir, gguf_file=name)``)."""
    from transformers import AutoConfig

    path = _check_path(path)
    with _shared_reader(reader) if reader is not None else contextlib.nullcontext():
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)


def load_gguf_tokenizer(source: str | os.PathLike | nn.Module):
    """transformers' tokenizer for a GGUF file, or for a model loaded by :func:`load_gguf` (its file, parsed once)."""
    from transformers import AutoTokenizer

    reader = None
    if isinstance(source, nn.Module):
        src = gguf_source(source)
        if src is None:
            raise ValueError("the model was not loaded with peqa_peft.load_gguf; pass the GGUF file's path")
        reader, source = src.reader(), src.path
    path = _check_path(source)
    with _shared_reader(reader) if reader is not None else contextlib.nullcontext():
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _row_permutation(processor, name: str, shape: tuple[int, int], mapping: dict) -> Optional[np.ndarray]:
    """The row order transformers' tensor processor gives tensor ``name``: ``None`` if it keeps the file's order.

    Raises ``ValueError`` if the processor does anything but re-order whole rows (then the layer cannot keep its
    blocks, whose bytes are rows of the file's layout).
    """
    rows, cols = shape
    probe = np.broadcast_to(np.arange(rows, dtype=np.float32)[:, None], (rows, cols)).copy()
    result = processor.process(weights=probe, name=name, tensor_key_mapping=mapping, parsed_parameters={"tensors": {}})
    out = np.asarray(result.weights)
    if result.name != name or out.shape != (rows, cols) or not (out == out[:, :1]).all():
        raise ValueError("transformers' tensor processor changes more than the row order")
    perm = out[:, 0].astype(np.int64)
    if not np.array_equal(np.sort(perm), np.arange(rows)):
        raise ValueError("transformers' tensor processor does not permute rows")
    return None if np.array_equal(perm, np.arange(rows)) else perm


def _perm_tuple(perm: Optional[np.ndarray]) -> Optional[tuple[int, ...]]:
    return None if perm is None else tuple(int(i) for i in perm)


def _quant_linear(
    codec, type_name: str, raw: np.ndarray, module: nn.Linear, perm: Optional[np.ndarray], where: str
) -> QuantLinear:
    """A ``QuantLinear`` holding the file's blocks of one tensor (rows re-ordered like transformers does).

    The decoded tensors pass the checks every adopted checkpoint layer gets (:mod:`..validation`): finite scales (of
    either sign: Q3_K/Q6_K sub-scales are signed), codes and integral zero-points inside the grid, finite fractional
    zero-points (``-m/d``), shapes.
    """
    grid = codec.GRIDS[type_name]
    try:
        codes, scale, zero = codec.decode(type_name, raw, module.in_features)
    except ValueError as err:  # the codec checks the raw blocks (e.g. a NaN fp16 d); say which file and tensor
        raise ValueError(f"{where}: {err}") from None
    fractional = zero.is_floating_point()
    validation.check_quantized_layer(
        where,
        grid.bits,
        module.out_features,
        module.in_features,
        grid.group_size,
        scale,
        zero_point=None if fractional else zero,
        codes=codes,
        sign="any",
    )
    if fractional:
        validation.check_finite(zero, where, "zero_point")
    if perm is not None:
        index = torch.from_numpy(perm)
        codes, scale, zero = codes[index], scale[index], zero[index]
    layer = QuantLinear(
        module.in_features,
        module.out_features,
        grid.bits,
        grid.group_size,
        bias=module.bias is not None,
        device=torch.device("meta"),
    )
    layer.qweight = pack_bits(codes.contiguous(), grid.bits)
    layer.scale = scale.to(torch.float32).contiguous()
    # integral zero-points stay uint8 (Q4_0/Q5_0/Q8_0/Q3_K/Q6_K); the mins of Q4_1/Q5_1/Q2_K/Q4_K/Q5_K are float32
    layer.zero_point = zero.contiguous()
    layer.source_dtype = None
    return layer


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` into the model under state-dict name ``name`` (replacing a meta placeholder)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    old = getattr(module, attr, None)
    if attr in module._parameters:
        requires_grad = old.requires_grad if old is not None else True
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=requires_grad and tensor.is_floating_point())
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        raise ValueError(f"the model has no parameter or buffer '{name}' (transformers' GGUF name map points there)")
    if old is not None and tuple(old.shape) != tuple(tensor.shape):
        raise ValueError(
            f"tensor '{name}' has shape {tuple(tensor.shape)} in the file, the model needs {tuple(old.shape)}"
        )


def load_gguf(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    adopt: bool = True,
):
    """Load a GGUF file as a transformers causal LM whose quantized linear layers are the file's own blocks.

    Args:
        path: the ``.gguf`` file (a single file; split GGUFs are not supported).
        dtype: dtype of every float tensor (embeddings, norms, float linear layers, biases) and of the computation.
            Adopted layers keep float32 scales whatever ``dtype`` is.
        adopt: ``False`` loads every weight dequantized (the same model as transformers' ``gguf_file=`` loader;
            for comparisons).

    Returns the model (in eval mode) with ``model.peqa_gguf_source`` set (see :class:`GGUFSource`). Linear layers in
    types PEQA cannot adopt (F16/F32/BF16, i-quants, ...) stay float, with one warning naming them: ``get_peft_model``
    then quantizes them with the ``PeqaConfig``'s grid as for any float model. The output head is never adopted
    (PEFT does not tune it); a tied head stays tied to the input embeddings.
    """
    import gguf
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map, load_gguf_checkpoint

    from . import codec

    path = _check_path(path).absolute()
    reader = gguf.GGUFReader(str(path))
    with _shared_reader(reader):
        config = load_gguf_config(path, reader)
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    architecture = str(reader.fields["general.architecture"].contents())
    config.name_or_path = str(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    source = GGUFSource(str(path), architecture, dtype=dtype, processor_config=parsed)
    processor = source.processor()
    with _shared_reader(reader):
        mapping = get_gguf_hf_weights_map(model, processor)

    head = model.get_output_embeddings()
    refs, float_linears = [], []
    direct: dict[str, Any] = {"tensors": {}}
    for tensor in reader.tensors:
        type_name = tensor.tensor_type.name
        hf_name = mapping.get(tensor.name)
        module, perm, rows_only = None, None, False
        if hf_name is not None and hf_name.endswith(".weight"):
            candidate = model.get_submodule(hf_name.removesuffix(".weight"))
            if type(candidate) is nn.Linear and candidate is not head:
                module = candidate
        if module is not None:
            shape = (module.out_features, module.in_features)
            why = None
            try:
                perm = _row_permutation(processor, tensor.name, shape, mapping)
                rows_only = True
            except ValueError as err:
                why = str(err)
            if not adopt:
                why = "adopt=False"
            elif why is not None:
                pass
            elif type_name not in codec.ADOPTABLE:
                why = f"{type_name} is not a type PEQA adopts"
            elif tuple(int(d) for d in reversed(tensor.shape)) != shape:
                why = f"its shape {tuple(reversed(tensor.shape))} is not the model's {shape}"
            elif module.in_features % codec.GRIDS[type_name].block_size:
                why = f"in_features={module.in_features} is not whole {type_name} blocks"
            if why is None:
                module_name = hf_name.removesuffix(".weight")
                layer = _quant_linear(
                    codec, type_name, np.asarray(tensor.data), module, perm, f"{path}: tensor '{tensor.name}'"
                )
                model.set_submodule(module_name, layer)
                refs.append(GGUFTensorRef(tensor.name, type_name, hf_name, True, _perm_tuple(perm), linear=True))
                continue
            if adopt:
                float_linears.append(f"{hf_name.removesuffix('.weight')} ({type_name}: {why})")
        # Everything else exactly as transformers' load_gguf_checkpoint: dequantize, process, cast.
        weights = gguf.dequantize(tensor.data, tensor.tensor_type)
        result = processor.process(
            weights=weights, name=tensor.name, tensor_key_mapping=mapping, parsed_parameters=direct
        )
        target = mapping.get(result.name) if result.name is not None else None
        linear = rows_only and target == hf_name  # the exporter can write it back (rows un-permuted)
        refs.append(GGUFTensorRef(tensor.name, type_name, target, False, _perm_tuple(perm), linear=linear))
        if target is None:
            continue
        _assign(model, target, torch.from_numpy(np.copy(result.weights)).to(dtype))
    for name, value in direct["tensors"].items():  # tensors some processors place themselves (MoE experts, GPT-2 head)
        _assign(model, name, value.to(dtype))
    model.tie_weights()
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"]
    if missing:
        raise ValueError(
            f"'{path.name}' has no tensor for {len(missing)} of the model's weights (first: '{missing[0]}'); "
            f"transformers' GGUF name map for '{architecture}' does not cover this file"
        )
    if float_linears:
        warnings.warn(
            f"load_gguf: {len(float_linears)} linear layer(s) stay float (PEQA will quantize them with the "
            f"PeqaConfig's grid, re-quantizing the file's values): {'; '.join(float_linears[:4])}"
            + (" ..." if len(float_linears) > 4 else ""),
            stacklevel=2,
        )
    source.tensors = refs
    setattr(model, SOURCE_ATTRIBUTE, source)
    return model.eval()


__all__ = [
    "GGUFSource",
    "GGUFTensorRef",
    "gguf_source",
    "load_gguf",
    "load_gguf_config",
    "load_gguf_tokenizer",
]
