"""peqa_peft.integrations.formats: merged PEQA models written as compressed-tensors, GGUF and GPTQ, checked by their
consumers.

Every format is verified with the tool that owns it, in a fresh process that never imports peqa_peft where the
consumer is a Python library (transformers for compressed-tensors and GGUF, GPTQModel in its own virtualenv when
present), with llama.cpp itself (llama-cpp-python) for GGUF, and for GPTQ additionally with an independent
reference unpacking written here from the published AutoGPTQ bit layout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import DEMO_LLAMA, REPO, tiny_llama
from peft import get_peft_model
from safetensors import safe_open

import peqa_peft
from peqa_peft import PeqaConfig
from peqa_peft.integrations.formats import _common, collect, export
from peqa_peft.integrations.formats.compressed_tensors import writer as ct_writer
from peqa_peft.integrations.formats.gguf import writer as gguf_writer

sys.path.insert(0, str(REPO / "benchmarks"))
from gguf_perplexity import llama_cpp_window_nll, open_llama, torch_nll  # noqa: E402  (the benchmark's NLL, shared)

PROMPT = "It was a dark and stormy night, and"
IDS = [[1, 907, 318, 262, 1327, 284, 345, 912, 92, 917, 15, 284]]
GPTQMODEL_PYTHON = os.environ.get("PEQA_GPTQMODEL_PYTHON", "/work/venvs/gptqmodel/bin/python")


def tuned(model, bits=4, group_size=None, seed=0, **config):
    """A PEQA model whose Δs is a small non-zero "tuning" (so that merging it matters)."""
    config.setdefault("init_method", "minmax")  # quick; the MSE search is not what these tests are about
    peft_model = get_peft_model(model, PeqaConfig(bits=bits, group_size=group_size, task_type="CAUSAL_LM", **config))
    gen = torch.Generator().manual_seed(seed)
    for name, param in peft_model.named_parameters():
        if "peqa_scale" in name or "peqa_zero_point" in name:
            base = peft_model.get_submodule(name.rsplit(".peqa_", 1)[0]).get_base_layer()
            noise = torch.randn(param.shape, generator=gen)
            param.data = 0.03 * base.scale * noise if "peqa_scale" in name else 0.3 * noise
    return peft_model.eval()


def demo_peqa(bits=4, group_size=None, **config):
    from transformers import AutoModelForCausalLM

    return tuned(AutoModelForCausalLM.from_pretrained(DEMO_LLAMA), bits, group_size, **config)


def run_fresh(script: str, cwd: Path, python: str = sys.executable, timeout: int = 600) -> dict:
    """Run ``script`` in a new interpreter without this repository on its path; it prints one JSON line."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    guard = "import sys, json\nassert 'peqa_peft' not in sys.modules\n"
    tail = "\nassert 'peqa_peft' not in sys.modules, 'the consumer imported peqa_peft'\n"
    proc = subprocess.run(
        [python, "-c", guard + textwrap.dedent(script) + tail],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@torch.no_grad()
def greedy(model, ids, n=32) -> list[int]:
    out = model.generate(input_ids=torch.tensor(ids), max_new_tokens=n, do_sample=False)
    return out[0, len(ids[0]) :].tolist()


# -------------------------------------------------------------------------------------------- compressed-tensors


@pytest.mark.slow
def test_compressed_tensors_loads_in_plain_transformers_with_identical_logits(tmp_path):
    """4-bit per channel, 3-bit group 16 (export()) and a merge_and_unload().save_pretrained(): a fresh process
    loads each with plain AutoModelForCausalLM.from_pretrained and reproduces our logits (fp32 scales: up to fp32
    summation order)."""
    ids = torch.tensor(IDS)
    expected = {}
    for name, (bits, group) in {"w4": (4, None), "w3g16": (3, 16)}.items():
        model = demo_peqa(bits, group)
        with torch.no_grad():
            expected[name] = model(ids).logits
        export(model, tmp_path / name, format="compressed-tensors")
    merged = demo_peqa(4, None, seed=1).merge_and_unload()
    with torch.no_grad():
        expected["merged"] = merged(ids).logits
    merged.save_pretrained(tmp_path / "merged")
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "compressed-tensors" in card and "4-bit" in card

    got = run_fresh(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        out = {{}}
        for name in {sorted(expected)!r}:
            model = AutoModelForCausalLM.from_pretrained(name)
            assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear"
            with torch.no_grad():
                out[name] = model(torch.tensor({IDS!r})).logits.tolist()
        print(json.dumps(out))
        """,
        tmp_path,
    )
    for name, logits in expected.items():
        config = json.loads((tmp_path / name / "config.json").read_text())["quantization_config"]
        assert (
            config["format"] == "pack-quantized"
            and config["config_groups"]["group_0"]["weights"]["symmetric"] is False
            and config["dequantize"] is True  # what lets plain from_pretrained read the canonical layout
        )
        with safe_open(tmp_path / name / "model.safetensors", "pt") as f:  # the canonical (llm-compressor) shape
            zero_point = f.get_slice("model.layers.0.mlp.up_proj.weight_zero_point").get_shape()
        bits = 3 if name == "w3g16" else 4
        assert zero_point[0] == -(-688 * bits // 32), (name, zero_point)
        # fp32 scales are stored exactly; what remains is fp32 summation order (our kernels apply s after x·(q−z)ᵀ)
        torch.testing.assert_close(torch.tensor(got[name]), logits, rtol=1e-5, atol=5e-5, msg=name)
    # the same checkpoints load in a process that has imported peqa_peft (its loader fix must leave them alone)
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "w3g16")(ids).logits
    torch.testing.assert_close(reloaded, expected["w3g16"], rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("bits,group_size", [(4, None), (3, 16), (8, 32)])
def test_compressed_tensors_tensors_are_the_library_compressors(bits, group_size):
    """Our tensors (the canonical packed layout, what llm-compressor writes) equal what compressed-tensors' own
    PackedQuantizationCompressor makes of the dequantized weight, and its decompressor returns the PEQA weight."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor

    exported = collect(tuned(tiny_llama(), bits, group_size))
    scheme = ct_writer.quantization_config(exported).config_groups["group_0"]
    for layer in list(exported.layers.values())[:3]:
        ours = ct_writer.layer_tensors(layer, torch.float32)
        weight = gguf_writer.dequantized(layer)
        offset = 1 << (bits - 1)
        state = {
            "weight": weight,
            "weight_scale": layer.scale,
            "weight_zero_point": (layer.zero.to(torch.int16) - offset).to(torch.int8),
        }
        theirs = PackedQuantizationCompressor.compress(state, scheme)
        for key in ("weight_packed", "weight_zero_point", "weight_shape"):
            assert torch.equal(ours[key], theirs[key]), (layer.name, key)
        restored = PackedQuantizationCompressor.decompress(ours, scheme)["weight"]
        torch.testing.assert_close(restored, weight, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------- GGUF


def _gguf_layer_weights(path: Path) -> dict:
    """Every weight of a GGUF file dequantized by gguf-py (llama.cpp's reference formats), by GGUF name."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type)) for t in reader.tensors}


@pytest.mark.parametrize(
    "bits,group_size,qtype", [(4, None, "Q4_1"), (5, 32, "Q5_1"), (3, 64, "Q4_0"), (2, 32, "Q4_0")]
)
def test_gguf_blocks_hold_the_codes_exactly(tmp_path, bits, group_size, qtype, demo_tokenizer):
    """Q4_1/Q5_1 blocks decode (gguf-py) to d*q + m with d = fp16(s), m = fp16(-d*z); Q4_0 blocks (every 2/3-bit
    layer) to d*(q - z) with d = fp16(s) and nothing else rounded: the PEQA codes, unchanged."""
    model = tuned(tiny_llama(vocab_size=4096), bits, group_size)
    export(model, tmp_path / "out", format="gguf", tokenizer=demo_tokenizer)
    weights = _gguf_layer_weights(tmp_path / "out" / "model.gguf")
    layer = collect(model).layers["model.layers.1.mlp.up_proj"]
    kind, data = weights["blk.1.ffn_up.weight"]
    assert kind == qtype
    per = layer.effective_group_size
    d = layer.scale.half().float().repeat_interleave(per, 1)
    zero = layer.zero.float().repeat_interleave(per, 1)
    if qtype == "Q4_0":
        expected = d * (layer.codes.float() - zero)
    else:
        m = (-(layer.scale.half().float() * layer.zero.float())).half().float().repeat_interleave(per, 1)
        expected = d * layer.codes.float() + m
    np.testing.assert_array_equal(data, expected.numpy())


def test_gguf_q4_0_only_where_every_code_fits_and_llama_cpp_decodes_it(tmp_path, demo_tokenizer):
    """A 4-bit layer takes Q4_0 only when every ``q - z + 8`` lies in [0, 15] (here: z = 8 everywhere), else Q4_1
    (one group with z = 7 and a code 15). llama.cpp's own dequantizer (its quantizer writing F32 from our file)
    gives exactly fp16(s) * (q - z) for the Q4_0 layer."""
    import ctypes

    import gguf

    llama_cpp = _llama_cpp()
    model = tuned(tiny_llama(vocab_size=4096), 4, 32)
    fits = "base_model.model.model.layers.0.mlp.up_proj"
    misfit = "base_model.model.model.layers.0.mlp.gate_proj"
    with torch.no_grad():
        base = model.get_submodule(fits).get_base_layer()
        base.zero_point.fill_(8)
        other = model.get_submodule(misfit).get_base_layer()
        other.zero_point.fill_(8)
        other.zero_point[3, 1] = 7
    codes = collect(model).layers[misfit.removeprefix("base_model.model.")].codes
    assert codes[3, 32:64].max() == 15  # minmax: the group's maximum takes the top code, 15 - 7 + 8 = 16 > 15
    exported = collect(model)
    assert gguf_writer.block_type(exported.layers[fits.removeprefix("base_model.model.")]) == "Q4_0"
    assert gguf_writer.block_type(exported.layers[misfit.removeprefix("base_model.model.")]) == "Q4_1"
    out = export(model, tmp_path / "out", format="gguf", tokenizer=demo_tokenizer) / "model.gguf"
    weights = _gguf_layer_weights(out)
    assert weights["blk.0.ffn_up.weight"][0] == "Q4_0" and weights["blk.0.ffn_gate.weight"][0] == "Q4_1"
    assert weights["blk.1.ffn_up.weight"][0] == "Q4_1"  # untouched layers of the 4-bit model keep Q4_1

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32
    params.allow_requantize = True
    params.nthread = 1
    f32 = tmp_path / "f32.gguf"
    assert llama_cpp.llama_model_quantize(str(out).encode(), str(f32).encode(), ctypes.byref(params)) == 0
    theirs = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(f32)).tensors}
    layer = exported.layers[fits.removeprefix("base_model.model.")]
    d = layer.scale.half().float().repeat_interleave(32, 1)
    expected = d * (layer.codes.float() - layer.zero.float().repeat_interleave(32, 1))
    np.testing.assert_array_equal(theirs["blk.0.ffn_up.weight"], expected.numpy())


def test_gguf_trained_zero_point_is_exact_and_odd_widths_fall_back(tmp_path, demo_tokenizer):
    """A fractional zero-point fits Q4_1's float offset; a 48-wide input (not 32-aligned) is stored as the
    dequantized weight (F32 here), and fallback='error' refuses it instead."""
    model = tuned(tiny_llama(vocab_size=4096, intermediate_size=48), 4, None, train_zero_point=True)
    exported = collect(model)
    assert exported.layers["model.layers.0.mlp.down_proj"].zero.is_floating_point()
    export(model, tmp_path / "out", format="gguf", tokenizer=demo_tokenizer, float_type="f32")
    weights = _gguf_layer_weights(tmp_path / "out" / "model.gguf")
    up = exported.layers["model.layers.0.mlp.up_proj"]
    kind, data = weights["blk.0.ffn_up.weight"]
    d = up.scale.half().float()
    m = (-(d * up.zero.float())).half().float()
    assert kind == "Q4_1"
    np.testing.assert_array_equal(data, (d * up.codes.float() + m).numpy())
    kind, data = weights["blk.0.ffn_down.weight"]
    assert kind == "F32"
    np.testing.assert_array_equal(data, gguf_writer.dequantized(exported.layers["model.layers.0.mlp.down_proj"]))
    with pytest.raises(ValueError, match="down_proj.*in_features=48 is not a multiple of 32"):
        export(model, tmp_path / "strict", format="gguf", tokenizer=demo_tokenizer, fallback="error")
    assert not (tmp_path / "strict").exists()


def test_gguf_rotary_row_order_round_trips_through_transformers(tmp_path, demo_tokenizer):
    """q/k rows are permuted to llama.cpp's rotary layout whether PEQA quantized them or not: transformers' GGUF
    loader, which undoes that permutation, reproduces the PEQA model's logits (f32 unquantized tensors)."""
    from transformers import AutoModelForCausalLM

    model = tuned(tiny_llama(vocab_size=4096), 4, None, target_modules=["q_proj", "v_proj", "up_proj"])
    export(model, tmp_path / "out", format="gguf", tokenizer=demo_tokenizer, float_type="f32")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="model.gguf")
    ids = torch.tensor([list(range(5, 40))])
    with torch.no_grad():
        ours, theirs = model(ids).logits, loaded(ids).logits
    # only the fp16 rounding of the Q4_1 block scale and offset separates them
    torch.testing.assert_close(theirs, ours, rtol=0, atol=2e-3 * ours.abs().max().item())


def _llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")


@pytest.mark.slow
def test_gguf_runs_in_llama_cpp_and_transformers_like_the_peqa_model(tmp_path, demo_tokenizer, data_dir):
    """The demo model, 4-bit per channel with a tuned Δs: llama.cpp's greedy 32 tokens equal ours and its
    WikiText-2 perplexity is within 1%; transformers' gguf_file= loader (fresh process) generates the same."""
    _llama_cpp()  # skips when llama-cpp-python is missing
    from peqa_peft.workflows.evaluate import load_eval_text

    # the paper's MSE initialisation (the default): with min-max RTN this model has near-ties (top-2 logit margin
    # 0.01) that fp16 embeddings flip; with MSE the margin is 0.06 and f16 and f32 exports both reproduce our tokens
    model = demo_peqa(4, None, init_method="mse")
    out = export(model, tmp_path / "gguf", format="gguf")
    ids = demo_tokenizer(PROMPT).input_ids
    ours = greedy(model, [ids])

    llm = open_llama(out / "model.gguf", n_ctx=256, n_batch=256, logits_all=True)
    assert llm.tokenize(PROMPT.encode()) == ids  # tokenizer metadata: same ids, BOS added
    theirs = []
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        theirs.append(token)
        if len(theirs) == 32:
            break
    assert theirs == ours

    tokens = demo_tokenizer(load_eval_text("wikitext2", data_dir)[:20000]).input_ids[:2560]
    windows = [tokens[i : i + 256] for i in range(0, len(tokens) - 255, 256)]
    ppl_ours = float(np.exp(torch_nll(model, windows)))
    ppl_cpp = float(np.exp(llama_cpp_window_nll(llm, windows)))
    llm.close()
    assert abs(ppl_cpp / ppl_ours - 1) < 0.01, (ppl_cpp, ppl_ours)

    got = run_fresh(
        f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained("gguf", gguf_file="model.gguf")
        tok = AutoTokenizer.from_pretrained("gguf", gguf_file="model.gguf")
        ids = tok({PROMPT!r}, return_tensors="pt").input_ids
        out = model.generate(input_ids=ids, max_new_tokens=32, do_sample=False)
        print(json.dumps({{"ids": ids[0].tolist(), "new": out[0, ids.shape[1]:].tolist()}}))
        """,
        tmp_path,
    )
    assert got == {"ids": ids, "new": ours}


# ---------------------------------------------------------------------------------------------------------- GPTQ


def reference_unpack_gptq(tensors: dict, bits: int, in_features: int, checkpoint_format: str) -> torch.Tensor:
    """Dequantize one GPTQ layer the way AutoGPTQ's reference code reads it (written independently of the writer).

    qweight rows hold input rows; for 2/4/8 bits code j of a word sits at bits [bits*j, bits*j + bits); for 3 bits
    32 rows share 3 words as one little-endian 96-bit stream (code k at bit 3k). qzeros packs output columns the
    same way; v1 ("gptq") adds the historic +1 to every stored zero.
    """
    mask = (1 << bits) - 1

    def unpack(words: torch.Tensor, count: int) -> torch.Tensor:
        # words: (n_words, cols) int32 -> (count, cols) codes
        w = words.to(torch.int64) & 0xFFFFFFFF
        if bits == 3:
            w = w.view(-1, 3, w.shape[1])
            out = []
            for k in range(32):
                start = 3 * k
                if start + 3 <= 32:
                    out.append((w[:, 0] >> start) & mask)
                elif start < 32:  # code 10: bits 30, 31 of word 0 and bit 0 of word 1
                    out.append(((w[:, 0] >> start) | (w[:, 1] << (32 - start))) & mask)
                elif start + 3 <= 64:
                    out.append((w[:, 1] >> (start - 32)) & mask)
                elif start < 64:  # code 21: bit 31 of word 1 and bits 0, 1 of word 2
                    out.append(((w[:, 1] >> (start - 32)) | (w[:, 2] << (64 - start))) & mask)
                else:
                    out.append((w[:, 2] >> (start - 64)) & mask)
            return torch.stack(out, 1).reshape(-1, w.shape[-1])[:count]
        per = 32 // bits
        shifts = torch.arange(0, 32, bits).view(1, per, 1)
        return ((w.unsqueeze(1) >> shifts) & mask).reshape(-1, w.shape[1])[:count]

    q = unpack(tensors["qweight"], in_features)  # (in, out)
    zeros = unpack(tensors["qzeros"].t().contiguous(), tensors["scales"].shape[1]).t()  # (groups, out)
    if checkpoint_format == "gptq":
        zeros = zeros + 1
    g = tensors["g_idx"].long()
    weight = tensors["scales"].float()[g] * (q - zeros[g]).float()
    return weight.t()  # (out, in)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("checkpoint_format", ["gptq_v2", "gptq"])
def test_gptq_layout_matches_the_reference_unpacking(tmp_path, bits, checkpoint_format, demo_tokenizer):
    from safetensors.torch import load_file

    model = tuned(tiny_llama(vocab_size=4096), bits, 32)
    exported = collect(model)
    if checkpoint_format == "gptq" and min(int(q.zero.min()) for q in exported.layers.values()) == 0:
        pytest.skip("a zero-point of 0 has no v1 encoding (tested separately)")
    export(model, tmp_path / "out", format="gptq", tokenizer=demo_tokenizer, checkpoint_format=checkpoint_format)
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, layer in exported.layers.items():
        local = {k: tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        weight = reference_unpack_gptq(local, bits, layer.in_features, checkpoint_format)
        expected = layer.scale.half().float().repeat_interleave(32, 1) * (
            layer.codes.float() - layer.zero.float().repeat_interleave(32, 1)
        )
        torch.testing.assert_close(weight, expected, rtol=0, atol=0, msg=name)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config == json.loads((tmp_path / "out" / "quantize_config.json").read_text())
    assert (config["bits"], config["group_size"], config["sym"], config["desc_act"]) == (bits, 32, False, False)
    assert config["checkpoint_format"] == checkpoint_format


@pytest.mark.slow
@pytest.mark.skipif(not Path(GPTQMODEL_PYTHON).exists(), reason="no GPTQModel venv (scripts/gptqmodel_venv.sh)")
def test_gptq_loads_in_gptqmodel_with_identical_weights(tmp_path, demo_tokenizer):
    """GPTQModel (its own venv, torch kernel on CPU) dequantizes every layer of our v2 export to the PEQA weight."""
    expected = {}
    for bits in (2, 3, 4, 8):
        model = tuned(tiny_llama(vocab_size=4096, hidden_size=128, intermediate_size=256), bits, 32)
        export(model, tmp_path / f"w{bits}", format="gptq", tokenizer=demo_tokenizer)
        for name, layer in collect(model).layers.items():
            scale = layer.scale.half().float().repeat_interleave(32, 1)
            zero = layer.zero.float().repeat_interleave(32, 1)
            # GPTQModel dequantizes in fp16 (its CPU kernel's dtype): one more rounding, of the product
            expected[f"w{bits}:{name}"] = (scale * (layer.codes.float() - zero)).half().float()
    got = run_fresh(
        """
        import torch
        from gptqmodel import BACKEND, GPTQModel
        out = {}
        for bits in (2, 3, 4, 8):
            model = GPTQModel.load(f"w{bits}", device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
            for name, module in model.model.named_modules():
                if hasattr(module, "dequantize_weight"):
                    out[f"w{bits}:{name}"] = module.dequantize_weight().float().t().tolist()
        print(json.dumps(out))
        """,
        tmp_path,
        python=GPTQMODEL_PYTHON,
    )
    assert sorted(got) == sorted(expected)
    for key, weight in expected.items():
        torch.testing.assert_close(torch.tensor(got[key]), weight, rtol=0, atol=0, msg=key)


# ------------------------------------------------------------------------------------------------------ bad input


def test_existing_output_directory_is_refused_and_kept(tmp_path, demo_tokenizer):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    model = tuned(tiny_llama(vocab_size=4096))
    for fmt in ("compressed-tensors", "gguf", "gptq"):
        with pytest.raises(FileExistsError, match="not empty.*overwrite"):
            export(model, out, format=fmt, tokenizer=demo_tokenizer)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    export(model, out, format="gptq", tokenizer=demo_tokenizer, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directories left


def test_a_failing_export_leaves_no_output(tmp_path, demo_tokenizer):
    model = tuned(tiny_llama(vocab_size=4096))

    def boom(*args, **kwargs):
        (args[1] / "half-written.safetensors").write_bytes(b"x")
        raise RuntimeError("disk full")

    with mock.patch.object(ct_writer, "write", boom), pytest.raises(RuntimeError, match="disk full"):
        export(model, tmp_path / "out", format="compressed-tensors", tokenizer=demo_tokenizer)
    assert list(tmp_path.iterdir()) == []


def test_layers_a_format_cannot_hold_are_refused_before_writing(tmp_path, demo_tokenizer):
    fractional = tuned(tiny_llama(vocab_size=4096), train_zero_point=True)
    for fmt in ("compressed-tensors", "gptq"):
        with pytest.raises(ValueError, match=r"layer 'model\.layers\.0\..*fractional zero-point.*gguf"):
            export(fractional, tmp_path / fmt, format=fmt, tokenizer=demo_tokenizer)
    with pytest.raises(ValueError, match="5-bit codes; the GPTQ format stores"):
        export(tuned(tiny_llama(vocab_size=4096), bits=5), tmp_path / "g5", format="gptq", tokenizer=demo_tokenizer)
    odd = tuned(tiny_llama(vocab_size=4096, intermediate_size=48), bits=3)
    with pytest.raises(ValueError, match="out_features=48 is not a multiple of 32"):
        export(odd, tmp_path / "g3", format="gptq", tokenizer=demo_tokenizer)
    with pytest.raises(ValueError, match="unknown export format 'onnx'"):
        export(odd, tmp_path / "x", format="onnx", tokenizer=demo_tokenizer)
    with pytest.raises(ValueError, match="no PEQA-quantized layer"):
        export(tiny_llama(), tmp_path / "plain", format="gptq", tokenizer=demo_tokenizer)
    assert list(tmp_path.iterdir()) == []


def test_vllm_cpu_target_refuses_what_vllms_cpu_kernel_cannot_serve(tmp_path, demo_tokenizer):
    """target="vllm-cpu" applies vLLM 0.32's CPUWNA16LinearKernel.can_implement rules per layer, naming the layer,
    before anything is written; without it the same models export (transformers loads them)."""
    ok = tuned(tiny_llama(vocab_size=4096), bits=4, group_size=32)
    assert ct_writer.vllm_cpu_problems(collect(ok)) == []
    export(ok, tmp_path / "ok", format="compressed-tensors", tokenizer=demo_tokenizer, target="vllm-cpu")
    cases = {
        "w3": (tuned(tiny_llama(vocab_size=4096), bits=3), r"layer 'model\.layers\.0\..*' is 3-bit.*4-bit only"),
        "w688": (demo_peqa(4, None), r"layer 'model\.layers\.0\.mlp\.\w+_proj' has \w+ size 688.*multiples of 32"),
        "g3": (
            tuned(tiny_llama(vocab_size=4096, hidden_size=96, intermediate_size=192), group_size=3),
            r"layer 'model\.layers\.0\.self_attn\.q_proj' has group size 3;.*even",
        ),
        "mixed": (
            get_peft_model(tiny_llama(), PeqaConfig(target_modules=["q_proj", "o_proj"], init_method="minmax")),
            r"vLLM fuses q_proj/k_proj/v_proj.*'model\.layers\.0\.self_attn\.k_proj' is not",
        ),
    }
    for name, (model, message) in cases.items():
        with pytest.raises(ValueError, match=r"target='vllm-cpu': " + message):
            export(model, tmp_path / name, format="compressed-tensors", tokenizer=demo_tokenizer, target="vllm-cpu")
        assert not (tmp_path / name).exists()
        ct_writer.validate(collect(model))  # the default target accepts it (transformers loads every such layer)
    with pytest.raises(ValueError, match="target must be one of"):
        export(ok, tmp_path / "x", format="compressed-tensors", tokenizer=demo_tokenizer, target="vllm")


def test_export_reloads_as_the_same_peqa_base_with_dequantize_false(tmp_path, demo_tokenizer):
    """The export's ``"dequantize": true`` makes transformers load dense weights; to tune it again with PEQA on its
    exact codes, load it compressed (peqa_peft's loader fix reads the packed zero-points) and PEQA adopts them."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = tuned(tiny_llama(vocab_size=4096), bits=4, group_size=32)
    export(model, tmp_path / "ct", format="compressed-tensors", tokenizer=demo_tokenizer)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", quantization_config=CompressedTensorsConfig())
    again = collect(get_peft_model(base, PeqaConfig(bits=4, group_size=32, task_type="CAUSAL_LM")))
    for name, layer in collect(model).layers.items():
        assert torch.equal(again.layers[name].codes, layer.codes), name
        assert torch.equal(again.layers[name].scale, layer.scale), name  # s0 + the merged deltas, fp32


def test_dequantized_export_is_tuned_in_its_own_codes(tmp_path, demo_tokenizer):
    """A plain ``from_pretrained`` of the default export is dense (``"dequantize": true``); PEQA still adopts the
    checkpoint's codes and scales, read from the files it was loaded from, instead of re-quantizing them. A weight
    changed after loading is refused; a config asking for another grid re-quantizes, with a warning."""
    from transformers import AutoModelForCausalLM

    model = tuned(tiny_llama(vocab_size=4096), bits=4, group_size=32)
    export(model, tmp_path / "ct", format="compressed-tensors", tokenizer=demo_tokenizer)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    assert type(base.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # dense: nothing quantized in memory
    again = collect(get_peft_model(base, PeqaConfig(task_type="CAUSAL_LM")))  # defaults: 4 bits, "auto"
    half = collect(
        get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.bfloat16), PeqaConfig())
    )
    for name, layer in collect(model).layers.items():
        assert torch.equal(again.layers[name].codes, layer.codes), name
        assert torch.equal(again.layers[name].scale, layer.scale), name
        # a bf16 load: the same codes, and the checkpoint's fp32 scales rather than their bf16 rounding
        assert torch.equal(half.layers[name].codes, layer.codes), name
        assert torch.equal(half.layers[name].scale, layer.scale), name

    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    with torch.no_grad():
        edited.model.layers[1].mlp.up_proj.weight[0, :4] += 0.37
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.*not on its stored grid"):
        get_peft_model(edited, PeqaConfig(task_type="CAUSAL_LM"))

    other = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    with pytest.warns(UserWarning, match=r"loaded dequantized .*bits=4, group_size=32.*re-quantized"):
        requantized = collect(get_peft_model(other, PeqaConfig(bits=3, init_method="minmax", task_type="CAUSAL_LM")))
    assert {layer.bits for layer in requantized.layers.values()} == {3}

    # a scheme PEQA cannot adopt, or a config it cannot parse: the dense weights are re-quantized, with a warning
    config_path = tmp_path / "ct" / "config.json"
    original = config_path.read_text()
    for edit, message in (
        ({"type": "float", "num_bits": 8, "strategy": "channel", "group_size": None}, "integer weight schemes only"),
        ({"strategy": "no-such-strategy"}, "quantization_config cannot be read"),
    ):
        config_path.write_text(original)
        dense = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
        config = json.loads(original)  # the files the model came from change after loading
        config["quantization_config"]["config_groups"]["group_0"]["weights"].update(edit)
        config_path.write_text(json.dumps(config))
        with pytest.warns(UserWarning, match=message):
            requantized = collect(get_peft_model(dense, PeqaConfig(init_method="minmax", task_type="CAUSAL_LM")))
        assert {layer.bits for layer in requantized.layers.values()} == {4}


def test_v1_gptq_refuses_a_zero_point_of_zero(tmp_path, demo_tokenizer):
    model = tuned(tiny_llama(vocab_size=4096), bits=2, group_size=32)
    layer = next(iter(collect(model).layers.values()))
    model.get_submodule("base_model.model." + layer.name).get_base_layer().zero_point[0, 0] = 0
    with pytest.raises(ValueError, match="zero-point of 0.*checkpoint_format='gptq_v2'"):
        export(model, tmp_path / "v1", format="gptq", tokenizer=demo_tokenizer, checkpoint_format="gptq")
    export(model, tmp_path / "v2", format="gptq", tokenizer=demo_tokenizer)  # v2 stores z itself
    assert not (tmp_path / "v1").exists()


def test_missing_tokenizer_is_one_clear_error(tmp_path):
    model = tuned(tiny_llama(vocab_size=4096))  # built from a config: no tokenizer anywhere
    for fmt in ("compressed-tensors", "gguf"):
        with pytest.raises(ValueError, match="tokenizer"):
            export(model, tmp_path / fmt, format=fmt)
    with pytest.raises(ValueError, match="no tokenizer found at"):
        export(model, tmp_path / "x", format="gptq", tokenizer=str(tmp_path / "nowhere"))
    assert list(tmp_path.iterdir()) == []


def test_export_does_not_modify_the_model_and_merges_the_active_adapter(tmp_path):
    model = tuned(tiny_llama())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layer = collect(model).layers["model.layers.0.self_attn.q_proj"]
    peqa = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert torch.equal(layer.scale, peqa.get_base_layer().scale + peqa.peqa_scale["default"].detach())
    with model.disable_adapter():
        assert torch.equal(collect(model).layers[layer.name].scale, peqa.get_base_layer().scale)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# ---------------------------------------------------------------------------------------------- CLI, save, push


@pytest.mark.slow
def test_cli_export_from_base_and_adapter(tmp_path, capsys):
    from peqa_peft.workflows.cli import main

    demo_peqa(4, None).save_pretrained(tmp_path / "adapter")
    args = ["export", "--model", str(DEMO_LLAMA), "--adapter", str(tmp_path / "adapter"), "--output-dir"]
    assert main([*args, str(tmp_path / "ct"), "--format", "compressed-tensors"]) == 0
    # the demo model's 688-wide MLP has no vLLM CPU kernel: refused up front with --ct-target vllm-cpu
    assert main([*args, str(tmp_path / "vllm"), "--format", "compressed-tensors", "--ct-target", "vllm-cpu"]) == 2
    assert "size 688" in capsys.readouterr().err and not (tmp_path / "vllm").exists()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "ct").iterdir()}
    assert main([*args, str(tmp_path / "ct"), "--format", "gguf"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main([*args, str(tmp_path / "ct"), "--format", "gguf", "--overwrite"]) == 0
    assert [p.name for p in (tmp_path / "ct").iterdir()] == ["model.gguf"]


def test_merged_model_push_to_hub_uploads_a_compressed_tensors_checkpoint(tmp_path):
    merged = tuned(tiny_llama(vocab_size=4096)).merge_and_unload()
    uploaded = {}

    def upload_folder(repo_id, folder_path, **kwargs):
        uploaded.update({p.name: p.read_bytes() for p in Path(folder_path).iterdir()})
        return "commit-url"

    fake_api = mock.MagicMock()
    fake_api.create_repo.return_value.repo_id = "user/peqa-w4"
    fake_api.upload_folder.side_effect = upload_folder
    with mock.patch("peqa_peft.integrations.hub.HfApi", return_value=fake_api):
        assert merged.push_to_hub("user/peqa-w4", private=True) == "commit-url"
    assert sorted(uploaded) == ["README.md", "config.json", "generation_config.json", "model.safetensors"]
    config = json.loads(uploaded["config.json"])["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert "compressed-tensors" in uploaded["README.md"].decode()


def test_atomic_helper_replaces_only_on_success(tmp_path):
    out = tmp_path / "o"
    with _common.atomic_output_dir(out) as tmp:
        (tmp / "a").write_text("1")
        assert not out.exists()
    assert (out / "a").read_text() == "1"
    with pytest.raises(KeyError), _common.atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
        raise KeyError
    assert sorted(p.name for p in out.iterdir()) == ["a"]
    assert peqa_peft.integrations.formats.FORMATS == ("compressed-tensors", "gguf", "gptq")
