"""Tiny GGUF files for the GGUF tests, written by the format's owners (shared by the codec and loader tests).

- :func:`write_f32_llama`: a one-layer Llama-architecture GGUF with float32 tensors, written with gguf-py's
  ``GGUFWriter`` (hyper-parameters only, no tokenizer: enough for llama.cpp's quantizer).
- :func:`llama_cpp_quantized`: that file quantized by llama.cpp itself (``llama_cpp.llama_model_quantize``) to one
  of :data:`LLAMA_FTYPES`; ``pure=True`` (default) gives every 2-D tensor the ftype's own block type, so a test
  gets Q2_K .. Q8_0 blocks exactly as llama.cpp's quantizer packs them.

Files are cached per (shape, seed, ftype) under the directory the caller passes (a pytest ``tmp_path_factory``
directory), so a session quantizes each only once.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

# llama.cpp ftype (as llama_cpp names it, without LLAMA_FTYPE_MOSTLY_) -> the block type a pure quantization writes.
LLAMA_FTYPES: dict[str, str] = {
    "Q4_0": "Q4_0",
    "Q4_1": "Q4_1",
    "Q5_0": "Q5_0",
    "Q5_1": "Q5_1",
    "Q8_0": "Q8_0",
    "Q2_K": "Q2_K",
    "Q3_K_M": "Q3_K",
    "Q4_K_M": "Q4_K",
    "Q5_K_M": "Q5_K",
    "Q6_K": "Q6_K",
}


def llama_weights(hidden: int = 256, ffn: int = 512, vocab: int = 320, seed: int = 0) -> dict[str, np.ndarray]:
    """Float32 tensors of a one-layer Llama (GGUF names; numpy shapes are (out, in), i.e. GGUF ne reversed).

    Rows get different magnitudes and some groups an offset, so that sub-scales and mins of the K-quants spread
    over their ranges (llama.cpp's quantizer then writes sc/mn of all sizes, zeros included).
    """
    rng = np.random.default_rng(seed)

    def lin(out_f: int, in_f: int) -> np.ndarray:
        w = rng.standard_normal((out_f, in_f)).astype(np.float32)
        w *= np.exp(rng.uniform(-3, 0, size=(out_f, in_f // 16, 1))).repeat(16, axis=1).reshape(out_f, in_f)
        w += 0.5 * rng.standard_normal((out_f, in_f // 32, 1)).repeat(32, axis=1).reshape(out_f, in_f)
        w[:, :16] = 0.0  # an all-zero group per row (d == 0 / sc == 0 cases)
        return (0.05 * w).astype(np.float32)

    kv = hidden // 2  # 4 heads, 2 kv heads
    return {
        "token_embd.weight": lin(vocab, hidden),
        "output_norm.weight": np.ones(hidden, dtype=np.float32),
        "output.weight": lin(vocab, hidden),
        "blk.0.attn_norm.weight": np.ones(hidden, dtype=np.float32),
        "blk.0.attn_q.weight": lin(hidden, hidden),
        "blk.0.attn_k.weight": lin(kv, hidden),
        "blk.0.attn_v.weight": lin(kv, hidden),
        "blk.0.attn_output.weight": lin(hidden, hidden),
        "blk.0.ffn_norm.weight": np.ones(hidden, dtype=np.float32),
        "blk.0.ffn_gate.weight": lin(ffn, hidden),
        "blk.0.ffn_up.weight": lin(ffn, hidden),
        "blk.0.ffn_down.weight": lin(hidden, ffn),
    }


def write_f32_llama(path: Path, hidden: int = 256, ffn: int = 512, vocab: int = 320, seed: int = 0) -> Path:
    """A float32 one-layer Llama GGUF written with gguf-py (4 heads, 2 KV heads)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(1)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for name, tensor in llama_weights(hidden, ffn, vocab, seed).items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_cpp_quantized(directory: Path, ftype: str, pure: bool = True, seed: int = 0) -> Path:
    """The F32 fixture quantized by llama.cpp to ``ftype`` (a key of :data:`LLAMA_FTYPES`); cached in ``directory``."""
    import llama_cpp

    if ftype not in LLAMA_FTYPES:
        raise ValueError(f"unknown ftype {ftype!r}; choose one of {', '.join(LLAMA_FTYPES)}")
    directory = Path(directory)
    source = directory / f"llama-f32-s{seed}.gguf"
    if not source.exists():
        write_f32_llama(source, seed=seed)
    out = directory / f"llama-{ftype}{'-pure' if pure else ''}-s{seed}.gguf"
    if not out.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
        params.pure = pure
        params.nthread = 1
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize({ftype}) failed with code {rc}")
    return out


_SCALAR = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "<u1",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}


def tensor_index(path: Path) -> dict[str, tuple[str, tuple[int, ...], np.ndarray]]:
    """name -> (GGML type name, GGUF dims (ne0 first), raw bytes as a read-only (rows, bytes_per_row) memmap).

    A minimal header walk for tests: gguf-py's ``GGUFReader`` builds a field object per tokenizer entry, which
    takes tens of seconds on Gemma's 262k-token vocabulary on this shared machine; the bytes are the same (checked
    against ``GGUFReader`` by test_gguf_codec.py on the llama.cpp fixtures).
    """
    import struct

    import gguf

    buf = np.memmap(path, dtype=np.uint8, mode="r")
    mv = memoryview(buf)
    pos = 0

    def take(fmt):
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, mv, pos)
        pos += struct.calcsize("<" + fmt)
        return vals

    def string():
        nonlocal pos
        (n,) = take("Q")
        s = bytes(mv[pos : pos + n]).decode("utf-8", "replace")
        pos += n
        return s

    def skip_value(vtype):
        nonlocal pos
        if vtype == 8:
            string()
        elif vtype == 9:
            itype, count = take("IQ")
            if itype in _SCALAR:
                pos += count * np.dtype(_SCALAR[itype]).itemsize
            else:
                for _ in range(count):
                    skip_value(itype)
        else:
            pos += np.dtype(_SCALAR[vtype]).itemsize

    magic, _version, n_tensors, n_kv = take("IIQQ")
    if magic != 0x46554747:
        raise ValueError(f"{path} is not a GGUF file")
    alignment = 32
    for _ in range(n_kv):
        key = string()
        (vtype,) = take("I")
        if key == "general.alignment":
            (alignment,) = take("I")
        else:
            skip_value(vtype)
    infos = []
    for _ in range(n_tensors):
        name = string()
        (n_dims,) = take("I")
        dims = take("Q" * n_dims)
        ttype, offset = take("IQ")
        infos.append((name, dims, gguf.GGMLQuantizationType(ttype), offset))
    start = (pos + alignment - 1) // alignment * alignment
    out = {}
    for name, dims, ttype, offset in infos:
        block, size = gguf.GGML_QUANT_SIZES[ttype]
        row_bytes = dims[0] // block * size
        rows = int(np.prod(dims[1:])) if len(dims) > 1 else 1
        raw = buf[start + offset : start + offset + rows * row_bytes].reshape(rows, row_bytes)
        out[name] = (ttype.name, tuple(int(d) for d in dims), raw)
    return out
