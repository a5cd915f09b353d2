"""GGUF in, same GGUF out: ``peqa_peft.load_gguf`` adopts the file's own blocks, ``export(format="gguf")`` rewrites it.

Checked against the owners: gguf-py's ``dequantize`` (every adopted layer), transformers' own ``gguf_file=`` loader
(logits), llama.cpp (teacher-forced logits of the unmodified file and of our tuned export, in a process that never
imports peqa_peft). Real files: SmolLM2-135M Q4_1 (+ Q8_0 embeddings) and Gemma 3 270M Q4_K_M (Q4_K, Q6_K, Q5_0,
Q8_0) from ``peqa_peft.model_zoo``; every other adoptable type on one-layer Llama files written by llama.cpp's own
quantizer (tests/gguf_fixtures.py).
"""

from __future__ import annotations

import json
import sys
import warnings

import gguf
import numpy as np
import pytest
import torch
from conftest import REPO
from gguf_fixtures import LLAMA_FTYPES, llama_cpp_quantized
from peft import get_peft_model

import peqa_peft
from peqa_peft import PeqaConfig, QuantLinear
from peqa_peft.core.kernels import kernels
from peqa_peft.integrations.formats import export
from peqa_peft.integrations.formats.gguf import codec, source_writer
from peqa_peft.integrations.formats.gguf.reader import gguf_source, load_gguf
from peqa_peft.workflows import model_zoo

sys.path.insert(0, str(REPO / "tests"))
from test_export import run_fresh  # noqa: E402  (fresh interpreter without this repository on its path)

SMOL = "smollm2-135m"
GEMMA = "gemma3-270m"

# llama.cpp with AMX weight repacking disabled, inline so that the consumer process never imports peqa_peft (the
# same patch as benchmarks/gguf_perplexity.py's open_llama; see there for why).
LLAMA_CPP_OPEN = """
import contextlib
from unittest import mock
import llama_cpp
def open_llama(path, **kwargs):
    patch = contextlib.nullcontext()
    if b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info():
        defaults = llama_cpp.llama_model_default_params
        def no_repack():
            params = defaults()
            params.use_extra_bufts = False
            return params
        patch = mock.patch.object(llama_cpp.llama.llama_cpp, "llama_model_default_params", no_repack)
    with patch:
        return llama_cpp.Llama(str(path), verbose=False, **kwargs)
def greedy(llm, ids, n):
    out = []
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        out.append(int(token))
        if len(out) == n:
            break
    return out
"""


def _zoo(name):
    if not model_zoo.available(name):
        pytest.skip(f"{name} is not installed ({model_zoo.INSTALL_HINT})")
    return model_zoo.gguf_path(name)


@pytest.fixture(scope="module")
def smol_path():
    return _zoo(SMOL)


@pytest.fixture(scope="module")
def smol(smol_path):
    return load_gguf(smol_path)


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf-fixtures")


def _reference_weights(path, model):
    """gguf-py's dequantization of every adopted tensor, in transformers' row order (its own tensor processor)."""
    import gguf

    source = gguf_source(model)
    processor = source.processor()
    reader = source.reader()
    refs = {r.gguf_name: r for r in source.tensors if r.adopted}
    out = {}
    for tensor in reader.tensors:
        ref = refs.get(tensor.name)
        if ref is None:
            continue
        weights = gguf.dequantize(tensor.data, tensor.tensor_type)
        weights = processor.process(weights=weights, name=tensor.name).weights
        out[ref.hf_name.removesuffix(".weight")] = (ref.type_name, torch.from_numpy(np.copy(weights)))
    return out


def _assert_adopted_equal_dequantize(path, model):
    """Adopted s*(q-z) == gguf.dequantize: bitwise for integral zeros, else to fp32 rounding."""
    reference = _reference_weights(path, model)
    assert reference, "nothing was adopted"
    modules = dict(model.named_modules())
    seen = set()
    for name, (type_name, expected) in reference.items():
        layer = modules[name]
        assert isinstance(layer, QuantLinear), name
        grid = codec.GRIDS[type_name]
        assert (layer.bits, layer.group_size) == (grid.bits, grid.group_size)
        got = layer.dequantize()
        if grid.fractional_zero:
            # s*(q - (-m/d)) vs d*q + m: float32 rounding of the form (codec's bound 2^-22 * max(|d q|, |m|))
            tol = 2.0**-21 * expected.abs().max().item()
            assert (got - expected).abs().max().item() <= tol, (name, type_name)
        else:
            assert torch.equal(got, expected), (name, type_name)
        seen.add(type_name)
    return seen


def test_smollm2_adopts_every_linear_as_the_files_q4_1_blocks(smol, smol_path):
    source = gguf_source(smol)
    assert source.path == str(smol_path.absolute()) and smol.config.name_or_path == str(smol_path.absolute())
    linears = [m for m in smol.modules() if isinstance(m, torch.nn.Linear)]
    assert linears == [smol.lm_head], "only the (tied) output head stays float"
    assert smol.lm_head.weight is smol.model.embed_tokens.weight  # tied embeddings stay tied
    assert set(source.types().values()) == {"Q4_1"} and len(source.types()) == 30 * 7
    # q/k rows come back in transformers' order (llama.cpp's rotary permutation undone on codes, scales and mins)
    assert {r.gguf_name.split(".")[2] for r in source.tensors if r.row_permutation} == {"attn_q", "attn_k"}
    assert _assert_adopted_equal_dequantize(smol_path, smol) == {"Q4_1"}
    # the model does not keep the file's parsed header alive (~150 MB of Python objects for this vocabulary,
    # measured as the adopted model's extra resident memory); export and the tokenizer re-open the file
    assert not any(isinstance(value, gguf.GGUFReader) for value in vars(source).values())


def test_smollm2_untuned_export_is_the_source_file(smol, smol_path, tmp_path):
    model = get_peft_model(smol, PeqaConfig(bits=4, group_size=32, task_type="CAUSAL_LM"))
    try:
        out = export(model, tmp_path / "gguf", format="gguf")
        assert (out / "model.gguf").read_bytes() == smol_path.read_bytes()
    finally:
        model.unload()


@pytest.mark.parametrize("ftype", list(LLAMA_FTYPES))
def test_every_type_written_by_llama_cpp_is_adopted_exactly(quantized_dir, ftype):
    """One-layer Llama files quantized by llama.cpp (pure: every 2-D tensor in the ftype's block type)."""
    path = llama_cpp_quantized(quantized_dir, ftype)
    model = load_gguf(path)
    assert _assert_adopted_equal_dequantize(path, model) == {LLAMA_FTYPES[ftype]}
    assert not isinstance(model.lm_head, QuantLinear)  # the untied head stays float


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q6_K", "Q8_0"])
def test_logits_equal_transformers_gguf_loader(quantized_dir, ftype):
    """transformers' from_pretrained(gguf_file=) dequantizes with gguf-py: same logits up to fp32 rounding."""
    from transformers import AutoModelForCausalLM

    path = llama_cpp_quantized(quantized_dir, ftype)
    ours = load_gguf(path)
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids).logits, ref(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_mixed_grid_needs_adopt_checkpoint_grid(quantized_dir):
    """A Q4_K_M file (not pure) mixes Q4_K (4-bit, g32) and Q6_K (6-bit, g16) layers."""
    path = llama_cpp_quantized(quantized_dir, "Q4_K_M", pure=False)
    model = load_gguf(path)
    types = set(gguf_source(model).types().values())
    assert {"Q4_K", "Q6_K"} <= types, types
    with pytest.raises(ValueError, match="adopt_checkpoint_grid=True"):
        get_peft_model(model, PeqaConfig(bits=4, group_size=32, task_type="CAUSAL_LM"))
    peft_model = get_peft_model(model, PeqaConfig(adopt_checkpoint_grid=True, task_type="CAUSAL_LM"))
    grids = peft_model.peft_config["default"].base_fingerprint["grids"]
    assert {tuple(g) for g in grids.values()} == {(codec.GRIDS[t].bits, codec.GRIDS[t].group_size) for t in types}


def _tune(peft_model, ids, steps=3, lr=1e-2):
    params = [p for n, p in peft_model.named_parameters() if p.requires_grad]
    assert params and all("peqa_scale" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(params, lr=lr)
    peft_model.train()
    for _ in range(steps):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return peft_model.eval()


@pytest.mark.parametrize("mode", ["exact", "requantize"])
def test_tuned_k_quant_export(quantized_dir, tmp_path, mode):
    """Tuned K-quant layers: 'exact' writes Q4_1/Q5_1/F16 (values kept up to fp16), 'requantize' keeps the type."""
    import gguf

    path = llama_cpp_quantized(quantized_dir, "Q4_K_M", pure=False)
    model = get_peft_model(load_gguf(path), PeqaConfig(adopt_checkpoint_grid=True, task_type="CAUSAL_LM"))
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    _tune(model, ids, lr=1e-4)  # scales are ~1e-3: AdamW moves each by ~lr per step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = export(model, tmp_path / mode, format="gguf", k_quants=mode)
    summary = __import__("json").loads((out / source_writer.SUMMARY_FILE).read_text())
    written = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out / "model.gguf").tensors}
    source = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    if mode == "exact":
        assert summary["changed_type"] and any("written in another type" in str(w.message) for w in caught)
        for name, change in summary["changed_type"].items():
            assert change["to"] == {"Q4_K": "Q4_1", "Q5_K": "Q5_1"}.get(change["from"], "F16"), (name, change)
            assert written[name] == change["to"]
        # the exact fallbacks hold our tuned weights up to fp16 rounding of scales and mins
        reader = gguf.GGUFReader(out / "model.gguf")
        layers = source_writer.quantized_layers(model)
        for ref in gguf_source(model).tensors:
            if ref.gguf_name not in summary["changed_type"]:
                continue
            base, scale, zero = layers[ref.hf_name.removesuffix(".weight")]
            tensor = next(t for t in reader.tensors if t.name == ref.gguf_name)
            got = torch.from_numpy(gguf.dequantize(tensor.data, tensor.tensor_type).copy())
            codes = source_writer._codes(base)
            want = torch.from_numpy(source_writer._dequantized(codes, scale, zero))
            if ref.row_permutation:
                got = got[torch.tensor(ref.row_permutation)]
            assert (got - want).abs().max() <= 2e-3 * want.abs().max(), ref.gguf_name
    else:
        assert written == source and summary["requantized"]
        errors = [r["relative_weight_error"] for r in summary["requantized"].values()]
        assert all(0 <= e < 0.05 for e in errors), errors


def test_adapter_reloads_onto_the_gguf_in_a_fresh_process(quantized_dir, tmp_path):
    """save_pretrained -> (new interpreter) load_gguf + PeftModel.from_pretrained: same logits; base path recorded."""
    import json
    import os
    import subprocess

    path = llama_cpp_quantized(quantized_dir, "Q4_K_M", pure=False)
    model = get_peft_model(load_gguf(path), PeqaConfig(adopt_checkpoint_grid=True, task_type="CAUSAL_LM"))
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(1))
    _tune(model, ids, lr=1e-4)
    with torch.no_grad():
        ours = model(ids).logits
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(path.absolute()) and saved["adopt_checkpoint_grid"] is True
    script = f"""
import json, torch, peqa_peft
from peft import PeftModel
model = PeftModel.from_pretrained(peqa_peft.load_gguf({str(path)!r}), {str(tmp_path / "adapter")!r}).eval()
with torch.no_grad():
    print(json.dumps(model(torch.tensor({ids.tolist()!r})).logits.tolist()))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO)] + sys.path)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_refusals(smol_path, tmp_path, quantized_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_gguf(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_gguf(bad)
    path = llama_cpp_quantized(quantized_dir, "Q4_0")
    model = get_peft_model(load_gguf(path), PeqaConfig(bits=4, group_size=32, task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="unknown option"):
        export(model, tmp_path / "x", format="gguf", float_type="f16")
    with pytest.raises(ValueError, match="k_quants must be one of"):
        export(model, tmp_path / "x", format="gguf", k_quants="lossy")
    with pytest.raises(ValueError, match="tokenizer"):
        export(model, tmp_path / "x", format="gguf", tokenizer="somewhere")
    # a changed non-PEQA tensor cannot be written by copying the source: refused, nothing written
    with torch.no_grad():
        model.get_base_model().model.norm.weight.add_(0.5)
    with pytest.raises(ValueError, match="differs from the source file"):
        export(model, tmp_path / "x", format="gguf")
    assert not (tmp_path / "x").exists()


def test_f32_linears_stay_float_with_a_warning(quantized_dir, tmp_path):
    """F32 linear layers cannot be adopted: one warning; PEQA quantizes them; the export writes them as F32."""
    import gguf
    from gguf_fixtures import write_f32_llama

    path = write_f32_llama(tmp_path / "f32.gguf")
    with pytest.warns(UserWarning, match=r"7 linear layer\(s\) stay float .*F32 is not a type PEQA adopts"):
        model = load_gguf(path)
    peft_model = get_peft_model(model, PeqaConfig(bits=4, group_size=32, init_method="minmax", task_type="CAUSAL_LM"))
    out = export(peft_model, tmp_path / "out", format="gguf")
    written = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out / "model.gguf").tensors}
    assert set(written.values()) == {"F32"}


# --------------------------------------------------------------------------------------------- real models, slow


@pytest.mark.slow
def test_smollm2_logits_equal_transformers_gguf_loader(smol, smol_path):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(smol_path.parent), gguf_file=smol_path.name, dtype=torch.float32)
    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = smol(ids).logits, ref.eval()(ids).logits
    # fp32 rounding of s*(q + m/d) vs d*q + m, accumulated over 30 layers
    assert (a - b).abs().max().item() < 1e-3, (a - b).abs().max().item()


# llama.cpp multiplies Q4_1 weights with activations rounded to Q8_1 blocks, so its logits differ from the exact
# float ones by up to ~1.5 (mean ~0.26) on SmolLM2 (measured: logits up to ~30). Greedy decoding therefore agrees
# token for token only until the first near-tie; the comparison is teacher-forced instead: same tokens in, the top-1
# token must agree wherever our top-2 margin exceeds that rounding, and at most positions overall.
LLAMA_CPP_MARGIN = 1.0
LLAMA_CPP_MEAN_DIFF = 0.5
LLAMA_CPP_MIN_AGREEMENT = 0.75
# Free generation: llama.cpp continues each prompt greedily; at every generated position our model, given the same
# prefix, must pick llama.cpp's token unless our top-2 margin is within llama.cpp's rounding (a near-tie, after which
# the two texts may go different ways). Measured on the unmodified file, 4 prompts x 32 tokens: llama.cpp's free text
# equals ours for 32, 31, 13 and 5 tokens, every divergence at a margin below 0.3.
GREEDY_TOKENS = 24
GREEDY_PROMPTS = (
    "### Instruction:\nGive three tips for staying healthy.\n\n### Response:\n",
    "Once upon a time,",
    "The capital of France is",
    "def fibonacci(n):",
)


def _teacher_forced_llama_cpp(files: dict, ids: list[int], tmp_path, prompts: list[list[int]] = ()) -> dict:
    """llama.cpp's logits for ``ids`` under each file, and its free greedy continuation (``GREEDY_TOKENS`` tokens) of
    each of ``prompts`` under the last file (key ``"greedy"``), computed in a process that never imports peqa_peft."""
    outputs = {name: str(tmp_path / f"{name}.npy") for name in files}
    greedy_out = str(tmp_path / "greedy.json")
    run_fresh(
        LLAMA_CPP_OPEN
        + f"""
import gguf
import numpy as np
generated = []
for name, path in {dict((k, str(v)) for k, v in files.items())!r}.items():
    llm = open_llama(path, n_ctx=256, n_batch=256, logits_all=True)
    llm.eval({ids!r})
    np.save({outputs!r}[name], np.array(llm.scores[: {len(ids)}], dtype=np.float32))
    if name == {list(files)[-1]!r}:
        for prompt in {[list(p) for p in prompts]!r}:
            llm.reset()
            generated.append(greedy(llm, prompt, {GREEDY_TOKENS}))
    llm.close()
with open({greedy_out!r}, "w") as f:
    json.dump(generated, f)
print(json.dumps({{"ok": True}}))
""",
        tmp_path,
    )
    result = {name: np.load(path) for name, path in outputs.items()}
    with open(greedy_out) as f:
        result["greedy"] = json.load(f)
    return result


def _assert_llama_cpp_agrees(ours: np.ndarray, theirs: np.ndarray, what: str) -> None:
    top2 = np.sort(ours, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > LLAMA_CPP_MARGIN
    agree = ours.argmax(-1) == theirs.argmax(-1)
    assert clear.sum() >= 5, f"{what}: too few clear positions to compare ({clear.sum()})"
    assert agree[clear].all(), (what, np.flatnonzero(clear & ~agree))
    assert agree.mean() >= LLAMA_CPP_MIN_AGREEMENT, (what, agree.mean())
    assert np.abs(ours - theirs).mean() < LLAMA_CPP_MEAN_DIFF, (what, np.abs(ours - theirs).mean())


def _assert_greedy_text_is_ours(model, prompts: list[list[int]], generated: list[list[int]]) -> None:
    """Every token llama.cpp generated greedily is our greedy choice for the same prefix, except at near-ties."""
    equal = total = 0
    with kernels("eager"), torch.no_grad():
        for prompt, tokens in zip(prompts, generated):
            assert len(tokens) == GREEDY_TOKENS, (prompt, tokens)
            logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
            top2 = logits.topk(2).values
            ours = logits.argmax(-1)
            same = ours == torch.tensor(tokens)
            near_tie = (top2[:, 0] - top2[:, 1]) <= LLAMA_CPP_MARGIN
            assert (same | near_tie).all(), (prompt, torch.nonzero(~same & ~near_tie).flatten().tolist())
            equal, total = equal + int(same.sum()), total + len(tokens)
    assert equal >= 0.9 * total, (equal, total)


@pytest.mark.slow
def test_smollm2_round_trip_through_llama_cpp(smol, smol_path, tmp_path, data_dir):
    """Unmodified file and our tuned export (adopt -> 3 AdamW steps on the scales -> export), each read by llama.cpp
    in a process that never imports peqa_peft: llama.cpp's logits match ours (teacher-forced, see above), for the
    tuned file they match the tuned model far better than the untuned one, so the export carries the tuning, and the
    text llama.cpp generates greedily from the tuned file is the tuned model's greedy text up to near-ties."""
    pytest.importorskip("llama_cpp")
    from peqa_peft.workflows.evaluate import load_eval_text

    tokenizer = peqa_peft.load_gguf_tokenizer(smol)
    text = load_eval_text("wikitext2", data_dir)[:6000]
    ids = tokenizer(text[3000:]).input_ids[:64]
    train_ids = torch.tensor([tokenizer(text[:3000]).input_ids[:128]])
    # uncompiled kernels (same results): compiling each layer shape costs minutes on a loaded 2-core machine, and the
    # kernels are not what this test is about (tests/test_fast_paths.py compares them with the reference)
    with kernels("eager"), torch.no_grad():
        untuned = smol(torch.tensor([ids])).logits[0].numpy()
    model = get_peft_model(smol, PeqaConfig(bits=4, group_size=32, task_type="CAUSAL_LM"))
    try:
        with kernels("eager"):
            _tune(model, train_ids, steps=3, lr=3e-3)
            with torch.no_grad():
                tuned = model(torch.tensor([ids])).logits[0].numpy()
            out = export(model, tmp_path / "tuned", format="gguf")
        prompts = [tokenizer(p).input_ids for p in GREEDY_PROMPTS]
        cpp = _teacher_forced_llama_cpp({"source": smol_path, "tuned": out / "model.gguf"}, ids, tmp_path, prompts)
        _assert_greedy_text_is_ours(model, prompts, cpp["greedy"])
    finally:
        model.unload()
    _assert_llama_cpp_agrees(untuned, cpp["source"], "unmodified file")
    _assert_llama_cpp_agrees(tuned, cpp["tuned"], "tuned export")
    # the tuning moved the logits by much more than llama.cpp's rounding, and the exported file follows it
    to_tuned, to_untuned = np.abs(cpp["tuned"] - tuned).mean(), np.abs(cpp["tuned"] - untuned).mean()
    assert to_tuned < 0.5 * to_untuned, (to_tuned, to_untuned)


@pytest.mark.slow
def test_gemma3_q4_k_m_adoption():
    """The real K-quant file: Q4_K, Q6_K, Q5_0 and Q8_0 linear layers equal gguf-py's dequantization."""
    path = _zoo(GEMMA)
    model = load_gguf(path)
    assert _assert_adopted_equal_dequantize(path, model) == {"Q4_K", "Q6_K", "Q5_0", "Q8_0"}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    peft_model = get_peft_model(model, PeqaConfig(adopt_checkpoint_grid=True, task_type="CAUSAL_LM"))
    peft_model.print_trainable_parameters()


def test_non_finite_block_min_is_refused_naming_the_tensor(quantized_dir, tmp_path):
    """Adopted GGUF layers get the adopted-checkpoint checks: a Q4_1 block whose fp16 min is NaN is one clear error
    naming the file and tensor (not a layer that silently outputs NaN)."""
    import shutil

    import gguf

    source = llama_cpp_quantized(quantized_dir, "Q4_1")
    broken = tmp_path / "nan-min.gguf"
    shutil.copy(source, broken)
    reader = gguf.GGUFReader(str(source))
    tensor = next(t for t in reader.tensors if t.name.endswith("attn_q.weight"))
    assert tensor.tensor_type == gguf.GGMLQuantizationType.Q4_1
    with open(broken, "r+b") as f:  # a Q4_1 block: fp16 d, fp16 m, 16 bytes of nibbles
        f.seek(int(tensor.data_offset) + 2)
        f.write(np.array([np.nan], dtype=np.float16).tobytes())
    with pytest.raises(ValueError, match=rf"nan-min\.gguf: tensor '{tensor.name}'.*non-finite"):
        load_gguf(broken)
