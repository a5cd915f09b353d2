"""Deployment benchmark: decode speed and bytes of exported PEQA models, and task switching.

One run, same prompt, same machine, one thread everywhere (the machine is shared; ratios within the run are what to
read). For each model:

- decode tokens/s of the 4-bit PEQA export in llama.cpp (GGUF Q4_1, via llama-cpp-python) vs an fp16 GGUF of the
  same float model (written by the same writer with F16 tensors) vs the PEQA model in PyTorch (peqa_peft's packed
  layers) vs the fp32 model in PyTorch;
- bytes on disk of each (and of the quantized layers alone, GGUF Q4_1 vs F16);
- task switching: making another tuned adapter active on a resident base, from disk (PEQA Δs vs LoRA r8), vs
  reloading a whole exported model (GGUF in llama.cpp, compressed-tensors in transformers).

Models: the bundled demo model (real weights) and, with ``--llama-2048``, a Llama-shaped random-weight model with
hidden size 2048 built from a config at run time (speed and bytes only; its outputs mean nothing).

    python benchmarks/deploy.py --output-dir outputs/deploy [--llama-2048]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from peqa_peft import PeqaConfig  # noqa: E402
from peqa_peft.integrations.formats import _common, export  # noqa: E402
from peqa_peft.integrations.formats.gguf import writer as gguf_writer  # noqa: E402

DEMO = REPO / "assets" / "demo-llama"
PROMPT = "It was a dark and stormy night, and"
NEW_TOKENS = 64
DECODE_REPEATS = 3  # best of 3: other jobs on the shared machine only ever slow a run down
SWITCH_REPEATS = 5


def fp16_gguf(model, tokenizer, out_dir: Path) -> Path:
    """The float model as an all-F16 GGUF (norms F32), written by peqa_peft's GGUF writer with no quantized layer."""
    exported = _common.ExportModel(
        config=model.config,
        generation_config=None,
        layers={},
        tensors={},
        architecture=type(model).__name__,
    )
    _common._walk(model, "", exported, {})
    out_dir.mkdir(parents=True, exist_ok=True)
    return gguf_writer.write(exported, out_dir, tokenizer=tokenizer, float_type="f16")


def gguf_tensor_bytes(path: Path, names: set[str]) -> tuple[int, int]:
    """Bytes of the named tensors, and of all tensors, in a GGUF file."""
    import gguf

    tensors = gguf.GGUFReader(str(path)).tensors
    return sum(int(t.n_bytes) for t in tensors if t.name in names), sum(int(t.n_bytes) for t in tensors)


def safetensors_bytes(path: Path, prefixes: set[str]) -> int:
    """Bytes of the tensors of the given modules in a safetensors file (read from its header, nothing loaded)."""
    from safetensors import safe_open

    sizes = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I64": 8, "I8": 1, "U8": 1}
    total = 0
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            if key.rsplit(".", 1)[0] in prefixes:
                piece = f.get_slice(key)
                total += sizes[piece.get_dtype()] * int(np.prod(piece.get_shape()))
    return total


def llama_cpp_decode(path: Path, prompt_ids: list[int], n: int, repeats: int = DECODE_REPEATS) -> dict:
    from gguf_perplexity import open_llama

    start = time.perf_counter()
    llm = open_llama(path, n_ctx=256, n_threads=1, n_threads_batch=1)
    load_s = time.perf_counter() - start
    best = 0.0
    for _ in range(repeats):
        llm.reset()
        llm.eval(prompt_ids)  # prefill outside the decode timing
        tokens = []
        start = time.perf_counter()
        for _ in range(n):
            token = llm.sample(top_k=1, temp=0.0, repeat_penalty=1.0)
            tokens.append(token)
            llm.eval([token])
        best = max(best, n / (time.perf_counter() - start))
    llm.close()
    return {"tokens_per_s": best, "load_s": load_s, "tokens": tokens}


@torch.no_grad()
def torch_decode(model, prompt_ids: list[int], n: int, repeats: int = DECODE_REPEATS) -> dict:
    """Greedy decode with a KV cache, one token per forward, timed after the prompt's forward (best of repeats)."""
    from transformers import DynamicCache

    best = 0.0
    for _ in range(repeats):
        out = model(torch.tensor([prompt_ids]), past_key_values=DynamicCache(), use_cache=True)
        token = int(out.logits[0, -1].argmax())
        tokens = []
        start = time.perf_counter()
        for _ in range(n):
            tokens.append(token)
            out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
            token = int(out.logits[0, -1].argmax())
        best = max(best, n / (time.perf_counter() - start))
    return {"tokens_per_s": best, "tokens": tokens}


def _median_ms(fn, repeats: int = SWITCH_REPEATS) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def switch_adapter_ms(peft_model, adapter_dir: Path) -> float:
    """Disk → active: load a saved adapter onto the resident base and activate it (then drop it again)."""

    def once():
        peft_model.load_adapter(str(adapter_dir), adapter_name="other")
        peft_model.set_adapter("other")
        peft_model.set_adapter("default")
        peft_model.delete_adapter("other")

    once()  # warm-up
    return _median_ms(once)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _random_delta(peft_model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, param in peft_model.named_parameters():
        if "peqa_scale" in name or "lora_B" in name:
            param.data = 0.02 * torch.randn(param.shape, generator=gen) * (param.abs().mean() + 1e-3)


def run_model(
    label: str,
    base_fn,
    tokenizer,
    work: Path,
    bits: int = 4,
    init_method: str = "mse",
    new_tokens: int = NEW_TOKENS,
    peqa_repeats: int = DECODE_REPEATS,
) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    prompt_ids = tokenizer(PROMPT).input_ids
    result = {"model": label, "bits": bits, "new_tokens": new_tokens, "prompt_tokens": len(prompt_ids)}

    base = base_fn()
    base.save_pretrained(work / "fp32")
    result["fp32_torch"] = torch_decode(base, prompt_ids, new_tokens)
    result["bytes_fp32_safetensors"] = _dir_bytes(work / "fp32")
    fp16_path = fp16_gguf(base, tokenizer, work / "gguf-f16")
    result["llama_cpp_f16"] = llama_cpp_decode(fp16_path, prompt_ids, new_tokens)

    # LoRA task switching on the fp32 base (two adapters saved to disk)
    lora = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    _random_delta(lora, 1)
    lora.save_pretrained(work / "lora-b")
    result["switch_ms_lora"] = switch_adapter_ms(lora, work / "lora-b")
    del lora, base

    model = get_peft_model(base_fn(), PeqaConfig(bits=bits, init_method=init_method, task_type="CAUSAL_LM"))
    _random_delta(model, 2)
    model.save_pretrained(work / "peqa-b")
    result["bytes_peqa_adapter"] = _dir_bytes(work / "peqa-b")
    result["switch_ms_peqa"] = switch_adapter_ms(model, work / "peqa-b")
    result["peqa_torch"] = torch_decode(model, prompt_ids, new_tokens, peqa_repeats)

    q_path = export(model, work / "gguf-q", format="gguf", tokenizer=tokenizer) / "model.gguf"
    ct_dir = export(model, work / "ct", format="compressed-tensors", tokenizer=tokenizer)
    result["llama_cpp_q4"] = llama_cpp_decode(q_path, prompt_ids, new_tokens)
    result["q4_tokens_equal_peqa_torch"] = result["llama_cpp_q4"]["tokens"] == result["peqa_torch"]["tokens"]
    result["bytes_compressed_tensors"] = _dir_bytes(ct_dir)
    exported = _common.collect(model)
    qtypes = {name: gguf_writer.block_type(layer) for name, layer in exported.layers.items()}
    result["gguf_block_layers"] = sum(1 for t in qtypes.values() if t)
    result["gguf_float_fallback_layers"] = sorted({n.rsplit(".", 1)[-1] for n, t in qtypes.items() if not t})
    del model

    # bytes: whole files and the PEQA-quantized layers alone
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, exported.config.num_hidden_layers)
    names = {name_map.get_name(n + ".weight", try_suffixes=(".weight",)) for n in exported.layers}
    q_layers, q_total = gguf_tensor_bytes(q_path, names)
    f_layers, f_total = gguf_tensor_bytes(fp16_path, names)
    block_names = {name_map.get_name(n + ".weight", try_suffixes=(".weight",)) for n, t in qtypes.items() if t}
    qb_layers, _ = gguf_tensor_bytes(q_path, block_names)
    fb_layers, _ = gguf_tensor_bytes(fp16_path, block_names)
    result.update(
        quantized_layer_bytes_compressed_tensors=safetensors_bytes(ct_dir / "model.safetensors", set(exported.layers)),
        bytes_gguf_q=q_path.stat().st_size,
        bytes_gguf_f16=fp16_path.stat().st_size,
        quantized_layer_bytes_gguf_q=q_layers,
        quantized_layer_bytes_gguf_f16=f_layers,
        block_layer_bytes_ratio=qb_layers / fb_layers if fb_layers else None,
        quantized_layer_weights=sum(q.out_features * q.in_features for q in exported.layers.values()),
    )

    # reloading a whole exported model instead of switching adapters
    result["reload_ms_gguf_q_llama_cpp"] = result["llama_cpp_q4"]["load_s"] * 1000

    def load_ct():
        AutoModelForCausalLM.from_pretrained(ct_dir)

    result["reload_ms_compressed_tensors_transformers"] = _median_ms(load_ct, 3)
    return result


def llama_2048_factory(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        architectures=["LlamaForCausalLM"],
    )

    def build():
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()

    return build


def format_table(results: list[dict]) -> str:
    lines = [
        "| model | engine | weights | decode tokens/s | × fp32 PyTorch | bytes on disk |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in results:
        base = r["fp32_torch"]["tokens_per_s"]
        rows = [
            ("PyTorch", "fp32", r["fp32_torch"], r["bytes_fp32_safetensors"]),
            ("PyTorch + peqa_peft", f"PEQA {r['bits']}-bit (packed)", r["peqa_torch"], r["bytes_compressed_tensors"]),
            ("llama.cpp", "GGUF F16", r["llama_cpp_f16"], r["bytes_gguf_f16"]),
            ("llama.cpp", f"GGUF Q4_1 (PEQA {r['bits']}-bit export)", r["llama_cpp_q4"], r["bytes_gguf_q"]),
        ]
        for engine, weights, speed, nbytes in rows:
            lines.append(
                f"| {r['model']} | {engine} | {weights} | {speed['tokens_per_s']:.1f} | "
                f"{speed['tokens_per_s'] / base:.2f} | {nbytes / 1e6:.2f} MB |"
            )
    return "\n".join(lines)


def format_switching(results: list[dict]) -> str:
    lines = [
        "| model | PEQA Δs adapter (disk → active) | LoRA r8 adapter (disk → active) | reload GGUF in llama.cpp | "
        "reload compressed-tensors in transformers |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['switch_ms_peqa']:.1f} ms | {r['switch_ms_lora']:.1f} ms | "
            f"{r['reload_ms_gguf_q_llama_cpp']:.1f} ms | {r['reload_ms_compressed_tensors_transformers']:.1f} ms |"
        )
    return "\n".join(lines)


def format_bytes(results: list[dict]) -> str:
    lines = [
        "| model | PEQA-quantized layers in F16 | in the GGUF Q4_1 export (incl. F16 fallback layers) | "
        "in the compressed-tensors export | whole GGUF Q4_1 file / F16 file |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        f16 = 2 * r["quantized_layer_weights"]
        gguf_q, ct = r["quantized_layer_bytes_gguf_q"], r["quantized_layer_bytes_compressed_tensors"]
        lines.append(
            f"| {r['model']} | {f16 / 1e6:.2f} MB | {gguf_q / 1e6:.2f} MB ({gguf_q / f16:.1%}) | "
            f"{ct / 1e6:.2f} MB ({ct / f16:.1%}) | {r['bytes_gguf_q'] / r['bytes_gguf_f16']:.1%} |"
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="outputs/deploy")
    parser.add_argument("--llama-2048", action="store_true", help="also a random Llama with hidden size 2048")
    parser.add_argument("--llama-2048-layers", type=int, default=4)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results.append(
            run_model(
                "demo-llama (6.8M, real)",
                lambda: AutoModelForCausalLM.from_pretrained(DEMO).eval(),
                tokenizer,
                work / "demo",
            )
        )
        if args.llama_2048:
            results.append(
                run_model(
                    f"Llama-shaped random, hidden 2048, {args.llama_2048_layers} layers",
                    llama_2048_factory(args.llama_2048_layers),
                    tokenizer,
                    work / "l2048",
                    init_method="minmax",
                    new_tokens=16,  # PEQA in PyTorch decodes ~0.2 tokens/s here: fewer tokens, one timing
                    peqa_repeats=1,
                )
            )
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for r in results:
        for key in ("fp32_torch", "peqa_torch", "llama_cpp_f16", "llama_cpp_q4"):
            r[key].pop("tokens", None)
    (out / "deploy.json").write_text(json.dumps(results, indent=2) + "\n")
    machine = (
        f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at the end, torch {torch.__version__}, "
        "1 thread everywhere; "
        f"greedy decode of {', '.join(str(r['new_tokens']) for r in results)} new tokens after the "
        f"{results[0]['prompt_tokens']}-token prompt, best of {DECODE_REPEATS} (PEQA in PyTorch at hidden 2048: 1)"
    )
    report = "\n\n".join(
        [f"machine: {machine}", format_table(results), format_bytes(results), format_switching(results)]
    )
    (out / "deploy.md").write_text(report + "\n")
    print(report)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
