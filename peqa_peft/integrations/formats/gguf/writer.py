"""GGUF export for llama.cpp / Ollama (Llama-architecture models), written with the ``gguf`` package.

How each PEQA layer is stored (``W = s * (q - z)``, per output channel or per group of ``group_size`` inputs):

- **b ≤ 4 bits with integer zero-points whose codes all fit Q4_0 → Q4_0**, exactly: a Q4_0 block is
  ``w = d * (q' - 8)``; with ``d = s`` and ``q' = q - z + 8`` it is ``s * (q - z)`` up to the fp16 rounding of ``s``
  alone (no rounded offset, unlike Q4_1). ``q'`` must lie in ``[0, 15]``, which holds for every 2- and 3-bit layer
  (``q, z`` in ``[0, 7]``) and for a 4-bit layer only when its codes stay within ``[z - 8, z + 7]`` (e.g. ``z = 8``
  everywhere; PEQA's asymmetric 4-bit grid uses codes 0 and 15 in most groups, so most 4-bit layers take Q4_1).
  Q4_0 is 18 bytes per 32 weights instead of 20, and llama.cpp's Q4_0 dot product is its simplest.
- **otherwise b ≤ 4 bits → Q4_1**, exactly: a Q4_1 block is 32 consecutive inputs of one row with
  ``w = d * q + m``; with ``d = s`` and ``m = -s * z`` (both fp16, as the format stores them) and the 4-bit code
  ``q`` copied as it is, it is the PEQA weight up to the fp16 rounding of ``s`` and ``s * z``. (2- and 3-bit codes
  would fit the 4-bit field unchanged, but they always fit Q4_0, above.)
- **b = 5 → Q5_1**, exactly in the same way (5-bit codes, fp16 ``d`` and ``m``).
- This needs every block of 32 inputs inside one PEQA group: ``in_features % 32 == 0`` and per-channel scales or a
  ``group_size`` that is a multiple of 32. A trained (fractional) zero-point is fine: ``m`` is a float.
- **Anything else** — 6/7/8 bits (Q8_0 is symmetric and cannot hold a zero-point), ``in_features`` not a multiple
  of 32 (the demo model's 688-wide ``down_proj``), group sizes such as 16 — is stored as the dequantized weight in
  ``float_type`` (F16 by default: a clearly lossy rounding of each weight to fp16; ``"f32"`` is exact), or refused
  with ``fallback="error"``.

Everything else follows llama.cpp's ``convert_hf_to_gguf.py`` for ``LlamaForCausalLM``: tensor names from gguf's
``TensorNameMap``, ``q_proj``/``k_proj`` rows permuted to llama.cpp's rotary layout (for quantized layers the codes,
scales and zero-points are permuted together, so nothing is re-quantized), norms in F32, token embeddings and
``lm_head`` in ``float_type``, the Llama hyper-parameters, and a byte-level BPE tokenizer (``tokenizer.ggml.model =
"gpt2"``, token list and types as ``get_vocab_base``, merges and special tokens via ``gguf.SpecialVocab``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .._common import ExportModel, QuantWeight

BLOCK = 32  # weights per Q4_1 / Q5_1 block
FLOAT_TYPES = ("f16", "f32")
FALLBACKS = ("float", "error")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
GGUF_FILE = "model.gguf"


def _gguf():
    try:
        import gguf
    except ImportError as err:  # pragma: no cover - the [export] extra installs it
        raise ImportError("format='gguf' needs `pip install gguf` (peqa-peft[export])") from err
    return gguf


def q4_0_codes(layer: QuantWeight) -> Optional[torch.Tensor]:
    """The codes shifted to Q4_0's fixed offset 8, ``q - z + 8`` (uint8 ``(out, in)``), or ``None`` when the layer
    has more than 4 bits, a fractional zero-point, or a code that the shift puts outside ``[0, 15]``."""
    zero = layer.zero
    if layer.bits > 4 or (zero.is_floating_point() and not torch.equal(zero, zero.round())):
        return None
    shift = (8 - zero.to(torch.int16)).repeat_interleave(layer.effective_group_size, dim=1)
    shifted = layer.codes.to(torch.int16) + shift
    if shifted.min() < 0 or shifted.max() > 15:
        return None
    return shifted.to(torch.uint8)


def block_type(layer: QuantWeight) -> Optional[str]:
    """``"Q4_0"`` / ``"Q4_1"`` / ``"Q5_1"`` when the layer maps exactly onto those blocks (Q4_0 preferred: smaller,
    and no fp16 offset), else ``None`` (float fallback)."""
    if layer.in_features % BLOCK or layer.effective_group_size % BLOCK:
        return None
    if layer.bits <= 4:
        return "Q4_0" if q4_0_codes(layer) is not None else "Q4_1"
    if layer.bits == 5:
        return "Q5_1"
    return None


def _why_not_blocks(layer: QuantWeight) -> str:
    if layer.bits > 5:
        return f"{layer.bits}-bit codes (Q4_1/Q5_1 hold at most 5 bits; Q8_0 has no zero-point)"
    if layer.in_features % BLOCK:
        return f"in_features={layer.in_features} is not a multiple of {BLOCK}"
    return f"group_size={layer.group_size} is not a multiple of {BLOCK}"


def validate(
    model: ExportModel,
    float_type: str = "f16",
    fallback: str = "float",
    pre_tokenizer: Optional[str] = None,
    **_write_only,
) -> None:
    """Refuse what cannot be written: other architectures, bad options, fallback layers with ``fallback="error"``."""
    if model.architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF export supports {', '.join(SUPPORTED_ARCHITECTURES)}; this model is a {model.architecture}"
        )
    if float_type not in FLOAT_TYPES:
        raise ValueError(f"float_type must be one of {FLOAT_TYPES}, got '{float_type}'")
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {FALLBACKS}, got '{fallback}'")
    if fallback == "error":
        for layer in model.layers.values():
            if block_type(layer) is None:
                raise ValueError(
                    f"layer '{layer.name}' cannot be stored exactly in GGUF Q4_1/Q5_1 blocks: {_why_not_blocks(layer)}"
                    " (use fallback='float' to store its dequantized weight)"
                )


# ---------------------------------------------------------------------------------------------------------- blocks


def _block_qparams(layer: QuantWeight, rows: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """fp16 ``d = s`` and ``m = -d * z`` per block of 32 inputs, shape ``(out, in / 32)`` (rows permuted)."""
    per_group = layer.effective_group_size // BLOCK
    scale = layer.scale[rows].repeat_interleave(per_group, dim=1)
    zero = layer.zero[rows].float().repeat_interleave(per_group, dim=1)
    d = scale.to(torch.float16)
    m = (-(d.float() * zero)).to(torch.float16)  # with the rounded d, so that d*q + m = d*(q - z) up to m's rounding
    return d.numpy(), m.numpy()


def q4_1_blocks(layer: QuantWeight, rows: Optional[torch.Tensor] = None) -> np.ndarray:
    """The layer as Q4_1 rows: ``uint8 (out, in/32 * 20)``; each block is fp16 d, fp16 m, 16 bytes of nibbles."""
    rows = torch.arange(layer.out_features) if rows is None else rows
    q = layer.codes[rows].numpy().reshape(layer.out_features, -1, BLOCK)
    d, m = _block_qparams(layer, rows)
    qs = q[..., :16] | (q[..., 16:] << np.uint8(4))  # element j in the low nibble, j + 16 in the high one
    blocks = np.concatenate([d[..., None].view(np.uint8), m[..., None].view(np.uint8), qs], axis=-1)
    return blocks.reshape(layer.out_features, -1)


def q4_0_blocks(layer: QuantWeight, rows: Optional[torch.Tensor] = None) -> np.ndarray:
    """The layer as Q4_0 rows: ``uint8 (out, in/32 * 18)``; each block is fp16 d, 16 bytes of nibbles ``q - z + 8``."""
    rows = torch.arange(layer.out_features) if rows is None else rows
    codes = q4_0_codes(layer)
    if codes is None:
        raise ValueError(f"layer '{layer.name}' does not fit Q4_0 (see block_type)")
    q = codes[rows].numpy().reshape(layer.out_features, -1, BLOCK)
    d = layer.scale[rows].repeat_interleave(layer.effective_group_size // BLOCK, dim=1).to(torch.float16).numpy()
    qs = q[..., :16] | (q[..., 16:] << np.uint8(4))  # element j in the low nibble, j + 16 in the high one
    return np.concatenate([d[..., None].view(np.uint8), qs], axis=-1).reshape(layer.out_features, -1)


def q5_1_blocks(layer: QuantWeight, rows: Optional[torch.Tensor] = None) -> np.ndarray:
    """The layer as Q5_1 rows: each block is fp16 d, fp16 m, 4 bytes of fifth bits (LSB first), 16 nibble bytes."""
    rows = torch.arange(layer.out_features) if rows is None else rows
    q = layer.codes[rows].numpy().reshape(layer.out_features, -1, BLOCK)
    d, m = _block_qparams(layer, rows)
    qh = np.packbits(q >> np.uint8(4), axis=-1, bitorder="little")  # bit j of the uint32 = fifth bit of element j
    low = q & np.uint8(0x0F)
    qs = low[..., :16] | (low[..., 16:] << np.uint8(4))
    blocks = np.concatenate([d[..., None].view(np.uint8), m[..., None].view(np.uint8), qh, qs], axis=-1)
    return blocks.reshape(layer.out_features, -1)


def dequantized(layer: QuantWeight, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``s * (q - z)`` as float32 ``(out, in)`` (for layers GGUF blocks cannot hold)."""
    rows = torch.arange(layer.out_features) if rows is None else rows
    gs = layer.effective_group_size
    scale = layer.scale[rows].repeat_interleave(gs, dim=1)
    zero = layer.zero[rows].float().repeat_interleave(gs, dim=1)
    return scale * (layer.codes[rows].float() - zero)


# ---------------------------------------------------------------------------------------------------- architecture


def _rope_permutation(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order convert_hf_to_gguf.py gives q/k weights (``LlamaModel.permute``: HF's rotate-half → interleaved)."""
    idx = torch.arange(n_rows)
    return idx.reshape(n_head, 2, n_rows // n_head // 2).swapaxes(1, 2).reshape(n_rows)


def _rows_for(name: str, n_rows: int, config) -> Optional[torch.Tensor]:
    if name.endswith("self_attn.q_proj"):
        return _rope_permutation(n_rows, config.num_attention_heads)
    if name.endswith("self_attn.k_proj"):
        return _rope_permutation(n_rows, config.num_key_value_heads or config.num_attention_heads)
    return None


def _add_hparams(writer, config, file_type: int) -> None:
    gguf = _gguf()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(Path(getattr(config, "_name_or_path", "") or "model").name or "model")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    writer.add_rope_freq_base(float(theta))
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", None):
        raise ValueError(f"GGUF export does not write rope scaling '{rope_type}' yet")
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# ------------------------------------------------------------------------------------------------------- tokenizer

_GPT2_PRE = "gpt-2"


def _pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (``tokenizer.ggml.pre``).

    convert_hf_to_gguf.py identifies known models by hashing a test string's tokens; for tokenizers it does not know
    (like the demo model's), a plain byte-level pre-tokenizer with GPT-2's split regex is llama.cpp's ``"gpt-2"``.
    Anything else must be named with ``pre_tokenizer=...`` (llama.cpp's ``LLAMA_VOCAB_PRE_TYPE`` names).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"GGUF export needs a fast (tokenizer.json) tokenizer, got {type(tokenizer).__name__}; "
            "convert it with transformers first"
        )
    spec = json.loads(backend.to_str())
    model_type = (spec.get("model") or {}).get("type")
    pre = spec.get("pre_tokenizer") or {}
    if model_type == "BPE" and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return _GPT2_PRE
    raise ValueError(
        f"cannot tell llama.cpp's pre-tokenizer for this tokenizer (model {model_type}, pre-tokenizer "
        f"{pre.get('type')}); pass pre_tokenizer=... (e.g. 'llama-bpe', 'gpt-2') or use llama.cpp's convert script"
    )


def _vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and types for ids 0..vocab_size-1, as convert_hf_to_gguf.py's ``get_vocab_base``."""
    gguf = _gguf()
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is {vocab_size}")
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            special = decoder[i].special if i in decoder else False
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def _add_tokenizer(writer, tokenizer, config, pre_tokenizer: Optional[str]) -> None:
    gguf = _gguf()
    pre = pre_tokenizer or _pre_tokenizer_name(tokenizer)
    tokens, types = _vocab(tokenizer, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as tmp:
        # SpecialVocab reads merges, special ids and add_bos/eos from the saved tokenizer files (and config.json)
        tokenizer.save_pretrained(tmp)
        config.to_json_file(str(Path(tmp) / "config.json"))
        gguf.SpecialVocab(tmp, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


# ------------------------------------------------------------------------------------------------------------ write


def _float_dtype(float_type: str):
    return np.float16 if float_type == "f16" else np.float32


def write(
    model: ExportModel,
    out_dir: Path,
    tokenizer=None,
    float_type: str = "f16",
    fallback: str = "float",
    pre_tokenizer: Optional[str] = None,
    filename: str = GGUF_FILE,
) -> Path:
    """Write ``out_dir/filename`` (one self-contained GGUF file: metadata, tokenizer, tensors)."""
    gguf = _gguf()
    validate(model, float_type, fallback, pre_tokenizer)
    if tokenizer is None:
        raise ValueError("GGUF export needs the tokenizer (it is stored inside the .gguf file)")
    config = model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    qtypes = {name: block_type(layer) for name, layer in model.layers.items()}
    used = {t for t in qtypes.values() if t}
    file_type = {
        frozenset({"Q4_0"}): gguf.LlamaFileType.MOSTLY_Q4_0,
        frozenset({"Q4_1"}): gguf.LlamaFileType.MOSTLY_Q4_1,
        frozenset({"Q4_0", "Q4_1"}): gguf.LlamaFileType.MOSTLY_Q4_1,
        frozenset({"Q5_1"}): gguf.LlamaFileType.MOSTLY_Q5_1,
    }.get(frozenset(used), gguf.LlamaFileType.MOSTLY_F16 if float_type == "f16" else gguf.LlamaFileType.ALL_F32)

    path = out_dir / filename
    writer = gguf.GGUFWriter(str(path), "llama")
    _add_hparams(writer, config, int(file_type))
    _add_tokenizer(writer, tokenizer, config, pre_tokenizer)

    def gguf_name(hf_name: str) -> str:
        new = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ValueError(f"tensor '{hf_name}' has no llama.cpp name; GGUF export supports plain Llama models")
        return new

    for hf_name, tensor in model.tensors.items():
        module_name = hf_name.rsplit(".", 1)[0]
        rows = _rows_for(module_name, tensor.shape[0], config)
        data = (tensor if rows is None else tensor[rows]).float().numpy()  # unquantized q/k are permuted too
        # norms (1-D) stay F32 as llama.cpp expects; 2-D weights (embeddings, lm_head) in float_type
        writer.add_tensor(gguf_name(hf_name), data.astype(np.float32 if data.ndim == 1 else _float_dtype(float_type)))
    for name, layer in model.layers.items():
        rows = _rows_for(name, layer.out_features, config)
        qtype = qtypes[name]
        if qtype == "Q4_0":
            writer.add_tensor(
                gguf_name(name + ".weight"), q4_0_blocks(layer, rows), raw_dtype=gguf.GGMLQuantizationType.Q4_0
            )
        elif qtype == "Q4_1":
            writer.add_tensor(
                gguf_name(name + ".weight"), q4_1_blocks(layer, rows), raw_dtype=gguf.GGMLQuantizationType.Q4_1
            )
        elif qtype == "Q5_1":
            writer.add_tensor(
                gguf_name(name + ".weight"), q5_1_blocks(layer, rows), raw_dtype=gguf.GGMLQuantizationType.Q5_1
            )
        else:
            weight = dequantized(layer, rows).numpy().astype(_float_dtype(float_type))
            writer.add_tensor(gguf_name(name + ".weight"), weight)
        if layer.bias is not None:
            bias = layer.bias.float()
            writer.add_tensor(gguf_name(name + ".bias"), (bias if rows is None else bias[rows]).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
