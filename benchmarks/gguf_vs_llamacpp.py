"""Our GGUF export beside llama.cpp's own quantizations of the same model: decode speed, WikiText-2 perplexity, bytes.

    python benchmarks/gguf_vs_llamacpp.py --out benchmarks/results/gguf-vs-llamacpp

Two models, in one run:

- ``real``: SmolLM2-135M-Instruct (``model_zoo.gguf_path("smollm2-135m")``, a Q4_1 file) adopted with
  ``load_gguf``, tuned ``--steps`` PEQA steps on Alpaca, exported with ``export(format="gguf")`` ("ours": the file's
  own Q4_1 blocks with the tuned scales). The F16 file of the same tuned model is ours with every quantized tensor
  dequantized by gguf-py (``gguf.quants.dequantize``) and stored as F16, so it IS the tuned model up to fp16 rounding.
  llama.cpp's own Q4_0 / Q4_1 / Q4_K_M are written from that F16 file by llama.cpp's quantizer
  (``llama_cpp.llama_model_quantize``, its default tensor-type choices, no imatrix). Perplexity of every file by
  llama.cpp on the same WikiText-2 windows, beside the PEQA model's own in PyTorch.
- ``random``: a Llama-shaped model with random weights at hidden 2048 (built here, never saved beyond a temporary
  directory; ``--layers`` layers, the demo model's 4096-token tokenizer), PEQA-quantized at 4 bits, group 32 (ours:
  Q4_1) and at 3 bits, group 32 (ours: Q4_0, exact: see docs/guides/export.md); F16 and llama.cpp's quantizations
  as above, but with llama.cpp's ``token_embedding_type`` / ``output_tensor_type`` set to F16 as our export writes
  them, so that only the linear layers' block type differs. Decode speed only (its perplexity means nothing).

Decode speed: benchmarks/llama_cpp_score.py ``decode`` in a separate process that never imports peqa_peft; all files
of one model loaded at once, visited in turn for ``--rounds`` rounds (order rotated each round), each decoding
``--tokens`` tokens one at a time with ``--threads`` threads; the median seconds per token is reported, and the ratio
to llama.cpp's own file of the same block type.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCORER = Path(__file__).resolve().parent / "llama_cpp_score.py"
LLAMA_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q4_K_M": 15}  # llama_ftype values (llama.h)


def write_f16(src: Path, dst: Path) -> Path:
    """``src`` with every quantized tensor dequantized (gguf-py's reference) and stored as F16; metadata copied."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), arch=str(reader.fields[gguf.Keys.General.ARCHITECTURE].contents()))
    for field in reader.fields.values():  # as gguf-py's gguf_new_metadata.py copies them
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        if field.name == gguf.Keys.General.FILE_TYPE:
            writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    for tensor in reader.tensors:
        qtype = tensor.tensor_type
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            writer.add_tensor(tensor.name, np.asarray(tensor.data), raw_dtype=qtype)
        else:
            weight = gguf.quants.dequantize(np.asarray(tensor.data), qtype).astype(np.float16)
            writer.add_tensor(tensor.name, weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def llama_quantize(src: Path, dst: Path, name: str, threads: int, float_head: bool) -> Path:
    """llama.cpp's own quantizer (``llama_model_quantize``) from ``src`` to type ``name`` (e.g. ``"Q4_K_M"``)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_TYPES[name]
    params.nthread = threads
    if float_head:
        params.token_embedding_type = llama_cpp.GGML_TYPE_F16
        params.output_tensor_type = llama_cpp.GGML_TYPE_F16
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize {src} -> {name} failed")
    return dst


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each type ``path`` holds (gguf-py's reader)."""
    import gguf

    counts: dict[str, int] = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return counts


def run_scorer(*args: str) -> object:
    """benchmarks/llama_cpp_score.py in a fresh process (no PYTHONPATH: it never imports peqa_peft)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, str(SCORER), *args], capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise RuntimeError(f"llama_cpp_score {args[0]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def real_model(tmp: Path, args) -> dict:
    from gguf_adopt import scale_change, tune
    from gguf_perplexity import dense_check, dense_forward, torch_nll
    from peft import get_peft_model

    from peqa_peft import PeqaConfig, load_gguf, load_gguf_tokenizer
    from peqa_peft.integrations.formats import export
    from peqa_peft.workflows import model_zoo
    from peqa_peft.workflows.evaluate import load_eval_text

    path = model_zoo.gguf_path(args.model)
    model = load_gguf(path)
    tokenizer = load_gguf_tokenizer(model)
    peft_model = get_peft_model(model, PeqaConfig(adopt_checkpoint_grid=True, task_type="CAUSAL_LM"))
    losses, seconds = tune(peft_model, tokenizer, args.steps, args.train_seq_len, args.lr)
    peft_model.eval()
    tokens = tokenizer(load_eval_text("wikitext2")).input_ids[: args.max_tokens]
    windows = [tokens[i : i + args.seq_len] for i in range(0, len(tokens) - args.seq_len + 1, args.seq_len)]
    result = {"model": str(path), "steps": args.steps, "lr": args.lr, "losses": losses, "train_seconds": seconds}
    result["scale_change"] = scale_change(peft_model)
    result.update(windows=len(windows), seq_len=args.seq_len)
    with dense_forward(peft_model):  # the same weights, dequantized once (see gguf_perplexity.dense_forward)
        result["ppl_peqa_pytorch"] = float(np.exp(torch_nll(peft_model, windows)))
    result["dense_vs_peqa_forward_max_abs_logit_diff"] = dense_check(peft_model, windows[0][:32])
    files = {"ours": export(peft_model, tmp / "real-ours", format="gguf") / "model.gguf"}
    del peft_model, model
    files.update(_llama_files(files["ours"], tmp / "real", args.threads, float_head=False))
    (tmp / "windows.json").write_text(json.dumps(windows))
    windows_file = str(tmp / "windows.json")
    scores = run_scorer("nll", *map(str, files.values()), "--windows", windows_file, "--threads", str(args.threads))
    result["ppl_llama_cpp"] = {name: s["ppl"] for name, s in zip(files, scores)}
    result["files"] = _describe(files)
    result["decode"] = _decode(files, args)
    return result


def random_model(tmp: Path, args) -> dict:
    import torch
    from peft import get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from peqa_peft import PeqaConfig
    from peqa_peft.integrations.formats import export

    # the demo model's 4096-token tokenizer: a small vocabulary keeps the (F16) embedding and head from dominating
    tokenizer = AutoTokenizer.from_pretrained(Path(__file__).resolve().parents[1] / "assets/demo-llama")
    config = LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=args.layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=4096,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    files = {}
    for bits in (4, 3):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
        peft_model = get_peft_model(
            model, PeqaConfig(bits=bits, group_size=32, init_method="minmax", task_type="CAUSAL_LM")
        )
        out = export(peft_model, tmp / f"random-ours-w{bits}", format="gguf", tokenizer=tokenizer)
        files[f"ours_w{bits}"] = out / "model.gguf"
        del model, peft_model
    files.update(_llama_files(files["ours_w4"], tmp / "random", args.threads, float_head=True))
    config_summary = {k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers")}
    return {"config": config_summary, "files": _describe(files), "decode": _decode(files, args)}


def _llama_files(ours: Path, prefix: Path, threads: int, float_head: bool) -> dict[str, Path]:
    f16 = write_f16(ours, prefix.with_name(prefix.name + "-f16.gguf"))
    files = {"llama_cpp_f16": f16}
    for name in LLAMA_TYPES:
        dst = prefix.with_name(f"{prefix.name}-{name}.gguf")
        files[f"llama_cpp_{name}"] = llama_quantize(f16, dst, name, threads, float_head)
    return files


def _describe(files: dict[str, Path]) -> dict[str, dict]:
    return {name: {"bytes": path.stat().st_size, "tensor_types": tensor_types(path)} for name, path in files.items()}


def _decode(files: dict[str, Path], args) -> dict[str, object]:
    raw = run_scorer(
        "decode", *map(str, files.values()), "--tokens", str(args.tokens), "--rounds", str(args.rounds),
        "--threads", str(args.threads),
    )  # fmt: skip
    per_file = {name: raw["seconds_per_token"][str(path)] for name, path in files.items()}
    return {"load_average_1min": raw["load_average_1min"], "threads": args.threads, "per_file": per_file}


def _row(name: str, files: dict, decode: dict, ppl: dict | None, peer: str | None) -> str:
    median = decode["per_file"][name]["median"]
    ratio = ""
    if peer is not None:
        ratio = f"{median / decode['per_file'][peer]['median']:.3f}x {peer.removeprefix('llama_cpp_')}"
    types = ", ".join(f"{k} {v}" for k, v in sorted(files[name]["tensor_types"].items()))
    ppl_cell = "" if ppl is None else f" {ppl[name]:.3f} |"
    return f"| {name} | {types} | {files[name]['bytes']:,} | {1 / median:.1f} | {ratio} |{ppl_cell}"


PEERS = {"ours": "llama_cpp_Q4_1", "ours_w4": "llama_cpp_Q4_1", "ours_w3": "llama_cpp_Q4_0"}


def report(result: dict) -> str:
    lines = [
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, load average at start "
        f"{' '.join(result['machine']['load_average'])}; llama.cpp threads {result['args']['threads']}.",
    ]
    if "real" in result:
        lines += _real_report(result)
    if "random" in result:
        lines += _random_report(result)
    return "\n".join(lines)


def _real_report(result: dict) -> list[str]:
    real = result["real"]
    lines = [
        "",
        f"## Real: SmolLM2-135M-Instruct, tuned {real['steps']} PEQA steps (lr {real['lr']}; |Δs|/|s0| mean "
        f"{real['scale_change']['mean_rel']:.2e}, {100 * real['scale_change']['fp16_changed']:.1f}% of scales "
        "changed in fp16)",
        "",
        f"WikiText-2 perplexity, {real['windows']} windows x {real['seq_len']} tokens, by llama.cpp (the PEQA model "
        f"in PyTorch: {real['ppl_peqa_pytorch']:.3f}). Decode: median of {result['args']['rounds']} interleaved "
        f"rounds x {result['args']['tokens']} tokens; load average during decode "
        f"{real['decode']['load_average_1min']}.",
        "",
        "| file | tensor types | bytes | decode tok/s | time vs same type | WikiText-2 ppl |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name in real["files"]:
        lines.append(_row(name, real["files"], real["decode"], real["ppl_llama_cpp"], PEERS.get(name)))
    return lines


def _random_report(result: dict) -> list[str]:
    rnd = result["random"]
    cfg = rnd["config"]
    lines = [
        "",
        f"## Random weights, Llama-shaped: hidden {cfg['hidden_size']}, MLP {cfg['intermediate_size']}, "
        f"{cfg['num_hidden_layers']} layers, the demo model's 4096-token vocabulary (tied, F16 in every file)",
        "",
        f"Decode only; load average during decode {rnd['decode']['load_average_1min']}.",
        "",
        "| file | tensor types | bytes | decode tok/s | time vs same type |",
        "|---|---|---:|---:|---:|",
    ]
    for name in rnd["files"]:
        lines.append(_row(name, rnd["files"], rnd["decode"], None, PEERS.get(name)))
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="zoo name of the real model (a Llama-arch GGUF)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--train-seq-len", type=int, default=128, help="tokens per tuning step (batch 1)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=4, help="layers of the random hidden-2048 model")
    parser.add_argument("--tokens", type=int, default=32, help="decode tokens per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads (decode and quantize)")
    parser.add_argument("--only", choices=("real", "random"), help="measure one model (result-<name>.json)")
    parser.add_argument("--out", type=Path, help="write result.json and table.md here")
    args = parser.parse_args(argv)
    machine = {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version()}
    machine["load_average"] = Path("/proc/loadavg").read_text().split()[:3]
    result = {"machine": machine, "args": {k: str(v) for k, v in vars(args).items()}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.only in (None, "real"):
            print(f"[{time.strftime('%H:%M:%S')}] real model", file=sys.stderr, flush=True)
            result["real"] = real_model(tmp, args)
            print(json.dumps(result["real"]), flush=True)
        if args.only in (None, "random"):
            print(f"[{time.strftime('%H:%M:%S')}] random model", file=sys.stderr, flush=True)
            result["random"] = random_model(tmp, args)
    result["seconds"] = time.perf_counter() - start
    text = report(result)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        suffix = f"-{args.only}" if args.only else ""
        (args.out / f"result{suffix}.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / f"table{suffix}.md").write_text(text + "\n")


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
