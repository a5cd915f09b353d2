"""The GGUF block codec against its owners: gguf-py's dequantize and llama.cpp's own quantizer output.

Random-but-valid blocks of every adoptable type (every byte random, fp16 fields finite), files quantized by
llama.cpp (tests/gguf_fixtures.py) and the two real zoo models. "W" is PEQA's ``(codes - zero) * scale`` in float32.
"""

import time

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from gguf_fixtures import LLAMA_FTYPES, llama_cpp_quantized, tensor_index  # noqa: E402

from peqa_peft import model_zoo  # noqa: E402
from peqa_peft.integrations.formats.gguf import codec  # noqa: E402
from peqa_peft.integrations.formats.gguf.codec import ADOPTABLE, GRIDS, decode, encode, encode_requantized  # noqa: E402

K_QUANTS = [t for t in ADOPTABLE if t.endswith("_K")]
LEGACY = [t for t in ADOPTABLE if not t.endswith("_K")]
# Worst |W - gguf| per group, relative to the group's largest term max(|scale|*(2^bits-1), |scale*zero|): at most
# 7 * 2**-24 by the rounding analysis in the codec's docstring; measured 1.4-1.9 on real blocks, 4.0 on random ones.
FRACTIONAL_BOUND = 2.0**-21


def gtype(t):
    return gguf.GGMLQuantizationType[t]


def peqa_w(codes, scale, zero, t):
    g = GRIDS[t]
    return codec._peqa_weight(codes.numpy(), scale.numpy(), zero.numpy().astype(np.float32), g.group_size)


def random_blocks(t, n, seed=0, canonical=False):
    """``n`` random blocks of type ``t`` as raw (n, type_size) bytes; fp16 fields drawn finite (any sign, subnormals).

    ``canonical``: as llama.cpp's quantizer writes them (the largest sub-scale/min at the end of its range, no
    zero steps), the blocks whose (d, sub-scales) factorisation is unique, so they must round-trip byte for byte.
    """
    rng = np.random.default_rng(seed)
    g = GRIDS[t]
    f = codec._unpack(t, rng.integers(0, 256, size=(n, g.type_size), dtype=np.uint8))

    def finite(x):
        x = x.copy()
        x[~np.isfinite(x)] = np.float16(1.5)
        if canonical:
            x[x == 0] = np.float16(0.25)
        return x

    f.d = finite(f.d)
    if f.m is not None:
        f.m = finite(f.m)
    if canonical and f.sc is not None:
        lo, hi = codec._SC_RANGE[t]
        f.sc[:, 0] = lo if lo < 0 else hi
        if f.mn is not None:
            f.sc[:, 1:] = np.maximum(f.sc[:, 1:], 1)  # no zero-step groups
            f.mn[:, 0] = codec._MN_RANGE[t][1]
    return codec._pack(t, f)


def assert_matches_gguf(t, raw, codes, scale, zero):
    """W equals gguf-py's dequantization: bitwise for fixed zeros, within FRACTIONAL_BOUND otherwise."""
    g = GRIDS[t]
    ref = gguf.quants.dequantize(raw, gtype(t))
    w = peqa_w(codes, scale, zero, t)
    assert torch.isfinite(scale).all() and torch.isfinite(zero.float()).all()
    if not g.fractional_zero:
        assert zero.dtype == torch.uint8 and (zero == g.fixed_zero).all()
        np.testing.assert_array_equal(w, ref)
        return 0.0
    assert zero.dtype == torch.float32
    s, z = scale.numpy().reshape(-1, 1), zero.numpy().reshape(-1, 1)
    mag = np.maximum(np.abs(s) * ((1 << g.bits) - 1), np.abs(s * z))
    diff = np.abs(w - ref).reshape(-1, g.group_size)
    rel = np.divide(diff, mag, out=np.zeros_like(diff), where=mag > 0)
    assert (diff[(mag == 0).ravel()] == 0).all()
    assert rel.max() <= FRACTIONAL_BOUND, f"{t}: max error {rel.max() / 2**-24:.2f} x 2^-24 of the group magnitude"
    return float(rel.max())


def assert_same_weight(t, a, b):
    np.testing.assert_array_equal(peqa_w(*a, t), peqa_w(*b, t))


# ---------------------------------------------------------------------------------------------------------------


def test_grids_agree_with_gguf():
    assert set(GRIDS) == set(ADOPTABLE)
    for t, g in GRIDS.items():
        assert (g.block_size, g.type_size) == gguf.GGML_QUANT_SIZES[gtype(t)]
        assert g.type_name == t and g.block_size % g.group_size == 0
        assert g.fractional_zero == (g.fixed_zero is None)


@pytest.mark.parametrize("t", ADOPTABLE)
def test_unpack_pack_is_identity_on_any_bytes(t):
    raw = np.random.default_rng(1).integers(0, 256, size=(64, GRIDS[t].type_size), dtype=np.uint8)
    np.testing.assert_array_equal(codec._pack(t, codec._unpack(t, raw)), raw)


@pytest.mark.parametrize("t", ADOPTABLE)
def test_decode_random_blocks_matches_gguf(t):
    g = GRIDS[t]
    raw = random_blocks(t, 512).reshape(64, -1)  # 8 blocks per row
    codes, scale, zero = decode(t, raw, 8 * g.block_size)
    assert codes.dtype == torch.uint8 and codes.shape == (64, 8 * g.block_size)
    assert scale.dtype == torch.float32 and scale.shape == (64, 8 * g.block_size // g.group_size)
    assert int(codes.max()) < 1 << g.bits
    assert_matches_gguf(t, raw, codes, scale, zero)


@pytest.mark.parametrize("t", ADOPTABLE)
def test_encode_round_trip_random_blocks(t):
    """Every random block comes back value-identical; canonical blocks (llama.cpp's form) byte-identical."""
    g = GRIDS[t]
    raw = random_blocks(t, 2048, seed=2).reshape(256, -1)
    decoded = decode(t, raw, 8 * g.block_size)
    again = encode(t, *decoded)
    assert again is not None and again.shape == raw.shape and again.dtype == np.uint8
    assert_same_weight(t, decode(t, again, 8 * g.block_size), decoded)
    if t in LEGACY:  # random fp16 d is never 0 here, so no edge case: bytes
        np.testing.assert_array_equal(again, raw)
    canonical = random_blocks(t, 2048, seed=3, canonical=True).reshape(256, -1)
    np.testing.assert_array_equal(encode(t, *decode(t, canonical, 8 * g.block_size)), canonical)


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    return tmp_path_factory.mktemp("gguf_codec")


@pytest.mark.parametrize("ftype", list(LLAMA_FTYPES))
def test_llama_cpp_quantizer_output(quantized_dir, ftype):
    """Blocks packed by llama.cpp itself: decode matches gguf-py; encode gives the file's bytes back."""
    t = LLAMA_FTYPES[ftype]
    reader = gguf.GGUFReader(llama_cpp_quantized(quantized_dir, ftype))
    tensors = [x for x in reader.tensors if x.tensor_type.name == t]
    assert len(tensors) == 9  # pure quantization: every 2-D tensor
    for x in tensors:
        raw = np.asarray(x.data)
        decoded = decode(t, raw, int(x.shape[0]))
        assert_matches_gguf(t, raw, *decoded)
        again = encode(t, *decoded)
        if t != "Q2_K":
            np.testing.assert_array_equal(again, raw, err_msg=x.name)
            continue
        # Q2_K's 4-bit sub-scales round small groups to sc == 0 with a nonzero min: those groups hold one value,
        # their codes are not kept (documented); every other block is byte-identical.
        f = codec._unpack(t, raw.reshape(-1, GRIDS[t].type_size))
        edge = ((f.sc == 0) & (f.mn != 0)).any(axis=1)
        same = (again.reshape(-1, GRIDS[t].type_size) == raw.reshape(-1, GRIDS[t].type_size)).all(axis=1)
        assert same[~edge].all() and edge.any()
        assert_same_weight(t, decode(t, again, int(x.shape[0])), decoded)


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q8_0"])
def test_tensor_index_agrees_with_gguf_reader(quantized_dir, ftype):
    path = llama_cpp_quantized(quantized_dir, ftype)
    index = tensor_index(path)
    tensors = gguf.GGUFReader(path).tensors
    assert set(index) == {x.name for x in tensors}
    for x in tensors:
        t, dims, raw = index[x.name]
        assert t == x.tensor_type.name and dims == tuple(int(d) for d in x.shape)
        np.testing.assert_array_equal(raw, np.asarray(x.data).view(np.uint8).reshape(raw.shape))


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_real_models(name):
    """Every adoptable tensor decodes (fast); one tensor per type (and the embedding's first rows) matches gguf-py
    and re-encodes to the file's bytes."""
    if not model_zoo.available(name):
        pytest.skip(f"zoo model {name} is not installed ({model_zoo.INSTALL_HINT})")
    seen, elapsed = set(), 0.0
    for tensor_name, (t, dims, raw) in tensor_index(model_zoo.gguf_path(name)).items():
        if t not in ADOPTABLE:
            continue
        start = time.perf_counter()
        decoded = decode(t, raw, dims[0])
        elapsed += time.perf_counter() - start
        if t in seen and "token_embd" not in tensor_name:
            continue
        seen.add(t)
        rows = slice(0, 2048)  # bounds the check of the embedding (256k rows in Gemma)
        part = tuple(y[rows] for y in decoded)
        assert_matches_gguf(t, raw[rows], *part)
        np.testing.assert_array_equal(encode(t, *part), raw[rows], err_msg=tensor_name)
    assert seen >= ({"Q4_1", "Q8_0"} if name == "smollm2-135m" else {"Q4_K", "Q6_K"})
    assert elapsed < 60, f"decoding {name} took {elapsed:.0f}s"


# --------------------------------------------------------------------------------------------------------------
# edge cases


def one_block(t, **fields):
    """A single block of ``t``: codes 0..(2^bits-1) cycling, fields overridden by ``fields``."""
    g = GRIDS[t]
    f = codec._unpack(t, np.zeros((1, g.type_size), dtype=np.uint8))
    f.q = (np.arange(g.block_size) % (1 << g.bits)).astype(np.uint8)[None]
    f.d = np.array([0.5], dtype=np.float16)
    if f.m is not None:
        f.m = np.array([-0.25 if t in ("Q4_1", "Q5_1") else 0.125], dtype=np.float16)
    if f.sc is not None:  # canonical (llama.cpp's): the first group takes the end of the range
        f.sc[:] = np.arange(f.sc.shape[1]) % 7 + 1
        lo, hi = codec._SC_RANGE[t]
        f.sc[0, 0] = lo if lo < 0 else hi
    if f.mn is not None:
        f.mn[:] = np.arange(f.mn.shape[1]) % 5 + 1
        f.mn[0, 0] = codec._MN_RANGE[t][1]
    for k, v in fields.items():
        if k in ("sc", "mn"):
            getattr(f, k)[0, v[0]] = v[1]
        else:
            setattr(f, k, np.array([v], dtype=np.float16))
    return codec._pack(t, f)


@pytest.mark.parametrize("t", ["Q4_1", "Q5_1"])
@pytest.mark.parametrize("m", [0.75, 0.0])
def test_legacy_zero_d(t, m):
    raw = one_block(t, d=0.0, m=m)
    codes, scale, zero = decode(t, raw, 32)
    assert torch.isfinite(zero).all()
    assert_matches_gguf(t, raw, codes, scale, zero)
    if m:  # one value in the whole block: codes 0, zero 1, scale -m
        assert (codes == 0).all() and float(zero) == 1.0 and float(scale) == -m
        again = encode(t, codes, scale, zero)
        assert_same_weight(t, decode(t, again, 32), (codes, scale, zero))
    else:  # value 0 everywhere: the codes are kept and the bytes come back
        assert float(scale) == 0.0 and float(zero) == 0.0 and codes.unique().numel() > 1
        np.testing.assert_array_equal(encode(t, codes, scale, zero), raw)


def zero_ints(t, raw, *names):
    """``raw`` with the integer sub-scales/mins ``names`` set to 0 (as llama.cpp writes them with d/dmin == 0)."""
    f = codec._unpack(t, raw)
    for name in names:
        getattr(f, name)[:] = 0
    return codec._pack(t, f)


@pytest.mark.parametrize("t", ["Q4_0", "Q5_0", "Q8_0", "Q3_K", "Q6_K"])
def test_fixed_zero_types_with_zero_d_keep_their_bytes(t):
    raw = one_block(t, d=0.0)
    if t.endswith("_K"):
        raw = zero_ints(t, raw, "sc")
    codes, scale, zero = decode(t, raw, GRIDS[t].block_size)
    assert (scale == 0).all() and codes.unique().numel() > 1
    assert_matches_gguf(t, raw, codes, scale, zero)
    np.testing.assert_array_equal(encode(t, codes, scale, zero), raw)


@pytest.mark.parametrize("t", ["Q3_K", "Q6_K"])
def test_zero_d_with_nonzero_sub_scales_is_value_identical(t):
    """Not written by llama.cpp: with every scale 0 the sub-scales are unrecoverable, encode writes them 0."""
    raw = one_block(t, d=0.0)
    decoded = decode(t, raw, 256)
    again = encode(t, *decoded)
    assert (codec._unpack(t, again).sc == 0).all()
    assert_same_weight(t, decode(t, again, 256), decoded)


@pytest.mark.parametrize("t", ["Q2_K", "Q4_K", "Q5_K"])
def test_k_quant_zero_sub_scale_with_min(t):
    """A group with sc == 0 and a nonzero min holds -dmin*mn: codes 0, zero 1, scale dmin*mn (never NaN/inf)."""
    raw = one_block(t, sc=(3, 0))
    codes, scale, zero = decode(t, raw, 256)
    g = GRIDS[t]
    f = codec._unpack(t, raw)
    assert float(zero[0, 3]) == 1.0 and (codes[0, 3 * g.group_size : 4 * g.group_size] == 0).all()
    assert float(scale[0, 3]) == float(f.m[0]) * float(f.mn[0, 3])
    assert_matches_gguf(t, raw, codes, scale, zero)
    # value-identical: the constant group goes back to sc == 0 (the original codes are lost)
    again = encode(t, codes, scale, zero)
    assert codec._unpack(t, again).sc[0, 3] == 0
    assert_same_weight(t, decode(t, again, 256), (codes, scale, zero))


@pytest.mark.parametrize("t", ["Q2_K", "Q4_K", "Q5_K"])
@pytest.mark.parametrize("case", ["d0", "dmin0", "both0"])
def test_k_quant_zero_super_block_scales(t, case):
    fields = {"d0": {"d": 0.0}, "dmin0": {"m": 0.0}, "both0": {"d": 0.0, "m": 0.0}}[case]
    ints = {"d0": ("sc",), "dmin0": ("mn",), "both0": ("sc", "mn")}[case]
    raw = zero_ints(t, one_block(t, **fields), *ints)
    decoded = decode(t, raw, 256)
    assert_matches_gguf(t, raw, *decoded)
    again = encode(t, *decoded)
    assert_same_weight(t, decode(t, again, 256), decoded)
    if case != "d0":  # d == 0 with mins: constant groups, value-identical only
        np.testing.assert_array_equal(again, raw)


@pytest.mark.parametrize("t", ["Q3_K", "Q6_K"])
def test_negative_sub_scales(t):
    lo = codec._SC_RANGE[t][0]
    raw = one_block(t, sc=(0, lo))  # llama.cpp's canonical largest group: -32 / -128
    f = codec._unpack(t, raw)
    f.sc[0, 5] = -3
    raw = codec._pack(t, f)
    codes, scale, zero = decode(t, raw, 256)
    assert float(scale[0, 0]) == 0.5 * lo and float(scale[0, 5]) == -1.5
    assert_matches_gguf(t, raw, codes, scale, zero)
    np.testing.assert_array_equal(encode(t, codes, scale, zero), raw)


# --------------------------------------------------------------------------------------------------------------
# tuned scales


@pytest.mark.parametrize("t", LEGACY)
def test_legacy_encode_rounds_to_fp16(t):
    g = GRIDS[t]
    raw = random_blocks(t, 256, seed=4).reshape(32, -1)
    codes, scale, zero = decode(t, raw, 8 * g.block_size)
    tuned = scale * (1 + 0.01 * torch.randn(scale.shape, generator=torch.Generator().manual_seed(0)))
    blocks = encode(t, codes, tuned, zero)
    f = codec._unpack(t, blocks.reshape(-1, g.type_size))
    np.testing.assert_array_equal(f.d, tuned.numpy().reshape(-1).astype(np.float16))
    if g.fractional_zero:
        np.testing.assert_array_equal(f.m, (-(tuned * zero)).numpy().reshape(-1).astype(np.float16))
    np.testing.assert_array_equal(f.q.reshape(codes.shape), codes.numpy())
    if not g.fractional_zero:  # the fixed zero cannot move
        assert encode(t, codes, tuned, zero.float() + 0.5) is None


def test_legacy_encode_refuses_fp16_overflow():
    codes, scale, zero = decode("Q4_1", one_block("Q4_1"), 32)
    assert encode("Q4_1", codes, scale * 1e6, zero) is None


def ffn_up(quantized_dir, t):
    """llama.cpp's blocks of type ``t`` for the fixture's ffn_up (512 x 256) and its decode."""
    ftype = next(f for f, bt in LLAMA_FTYPES.items() if bt == t)
    _, dims, raw = tensor_index(llama_cpp_quantized(quantized_dir, ftype))["blk.0.ffn_up.weight"]
    raw = np.array(raw)
    return raw, decode(t, raw, dims[0])


@pytest.mark.parametrize("t", K_QUANTS)
def test_k_quant_encode_exact_only_when_it_factors(t, quantized_dir):
    g = GRIDS[t]
    raw, (codes, scale, zero) = ffn_up(quantized_dir, t)
    f = codec._unpack(t, raw.reshape(-1, g.type_size))
    # doubling every scale doubles d (and dmin, the zero staying): exact
    doubled = encode(t, codes, scale * 2, zero)
    assert doubled is not None
    assert_same_weight(t, decode(t, doubled, 256), (codes, scale * 2, zero))
    np.testing.assert_array_equal(codec._unpack(t, doubled.reshape(-1, g.type_size)).d, f.d * np.float16(2))
    # one group moved to a neighbouring sub-scale of the same d (its min kept): exact
    lo, hi = codec._SC_RANGE[t]
    sc1 = int(f.sc[0, 1])
    moved, zero = scale.clone(), zero.clone()
    moved[0, 1] = float(f.d[0]) * (sc1 + 1 if sc1 < hi else sc1 - 1)
    if g.fractional_zero:  # the zero decode would compute for the same dmin*mn
        zero[0, 1] = torch.tensor(np.float32(f.m[0]) * np.float32(f.mn[0, 1])) / moved[0, 1]
    got = encode(t, codes, moved, zero)
    assert got is not None
    assert_same_weight(t, decode(t, got, 256), (codes, moved, zero))
    assert codec._unpack(t, got[:1]).sc[0, 1] == int(round(float(moved[0, 1]) / float(f.d[0])))
    if g.fractional_zero:  # a zero one float32 ulp off: the min still factors to 2**-20, the weight does not
        nudged = zero.clone().view(-1)
        i = int((zero.abs() * (scale != 0)).view(-1).argmax())
        nudged[i] = torch.nextafter(nudged[i], torch.tensor(float("inf")))
        nudged = nudged.view(zero.shape)
        assert not np.array_equal(peqa_w(codes, scale, nudged, t), peqa_w(codes, scale, zero, t))
        assert encode(t, codes, scale, nudged) is None
    # a generic tuned scale does not factor
    tuned = scale * (1 + 0.01 * torch.randn(scale.shape, generator=torch.Generator().manual_seed(0)))
    assert encode(t, codes, tuned, zero) is None


@pytest.mark.parametrize("t", K_QUANTS)
def test_encode_requantized(t, quantized_dir):
    raw, (codes, scale, zero) = ffn_up(quantized_dir, t)
    # untouched: exact, the original bytes (Q2_K: value-identical, see the quantizer test)
    blocks, err = encode_requantized(t, codes, scale, zero)
    assert err == 0.0
    if t != "Q2_K":
        np.testing.assert_array_equal(blocks, raw)
    # tuned: the re-fit is closer to the tuned weight than the untuned file, and its error is what gguf-py sees
    gen = torch.Generator().manual_seed(0)
    tuned = scale * (1 + 0.02 * torch.randn(scale.shape, generator=gen)) + 0.002 * scale.abs().mean()
    blocks, err = encode_requantized(t, codes, tuned, zero)
    assert blocks.shape == raw.shape and np.array_equal(decode(t, blocks, 256)[0], codes)
    assert err == pytest.approx(codec.weight_error(t, blocks, codes, tuned, zero), rel=1e-3, abs=1e-6)
    assert err < codec.weight_error(t, raw, codes, tuned, zero)


# --------------------------------------------------------------------------------------------------------------
# bad input


def test_bad_input_raises_clear_errors():
    raw = one_block("Q4_K")
    with pytest.raises(ValueError, match="cannot be adopted"):
        decode("IQ4_XS", raw, 256)
    with pytest.raises(ValueError, match="bytes per row"):
        decode("Q4_K", raw, 512)
    with pytest.raises(ValueError, match="multiple of 256"):
        decode("Q4_K", raw, 100)
    with pytest.raises(ValueError, match="uint8 numpy array"):
        decode("Q4_K", raw.astype(np.int16), 256)
    bad = one_block("Q4_0")
    bad[0, 0:2] = np.array([np.inf], dtype="<f2").view(np.uint8)
    with pytest.raises(ValueError, match="non-finite"):
        decode("Q4_0", bad, 32)
    codes, scale, zero = decode("Q4_K", raw, 256)
    with pytest.raises(ValueError, match="codes must lie in"):
        encode("Q4_K", codes.to(torch.int16) + 16, scale, zero)
    with pytest.raises(ValueError, match="scale must have shape"):
        encode("Q4_K", codes, scale[:, :4], zero)
    with pytest.raises(ValueError, match="non-finite"):
        encode("Q4_K", codes, scale * float("nan"), zero)
    with pytest.raises(ValueError, match="fixed zero-point"):
        c, s, z = decode("Q6_K", one_block("Q6_K"), 256)
        encode_requantized("Q6_K", c, s * 1.01, z.float() + 1)


# --------------------------------------------------------------------------------------------------------------
# llama.cpp's own C dequantization (libggml-base from llama-cpp-python), not only gguf-py's port of it


def ggml_dequantize(t, raw):
    """``dequantize_row_<type>`` of the libggml that llama-cpp-python ships, on (rows, bytes) blocks."""
    import ctypes
    from pathlib import Path

    llama_cpp = pytest.importorskip("llama_cpp")
    lib = Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"
    if not lib.exists():
        pytest.skip(f"no {lib}")
    fn = getattr(ctypes.CDLL(str(lib)), f"dequantize_row_{t.lower().replace('_k', '_K')}")
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    raw = np.ascontiguousarray(raw)
    out = np.empty(raw.size // GRIDS[t].type_size * GRIDS[t].block_size, dtype=np.float32)
    fn(raw.ctypes.data, out.ctypes.data, out.size)
    return out.reshape(raw.shape[0], -1)


@pytest.mark.parametrize("t", ADOPTABLE)
def test_decode_matches_llama_cpp_c_code(t, monkeypatch):
    g = GRIDS[t]
    raw = random_blocks(t, 512, seed=6).reshape(64, -1)
    ref = ggml_dequantize(t, raw)
    np.testing.assert_array_equal(ref, gguf.quants.dequantize(raw, gtype(t)))  # the two owners agree
    monkeypatch.setattr(gguf.quants, "dequantize", lambda raw, qtype: ggml_dequantize(qtype.name, raw))
    assert_matches_gguf(t, raw, *decode(t, raw, 8 * g.block_size))


@pytest.mark.parametrize("t", ["Q4_1", "Q4_K", "Q6_K"])
def test_w_is_what_quantlinear_computes(t):
    """The "W" these tests compare is PEQA's own reference dequantization (dequantize_codes), bit for bit."""
    from peqa_peft.quant.functional import dequantize_codes

    g = GRIDS[t]
    codes, scale, zero = decode(t, random_blocks(t, 64, seed=7).reshape(8, -1), 8 * g.block_size)
    np.testing.assert_array_equal(
        dequantize_codes(codes, scale, zero, torch.float32).numpy(), peqa_w(codes, scale, zero, t)
    )
