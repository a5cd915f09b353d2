"""Adopting a GGUF file (``peqa_peft.load_gguf``) vs transformers' float GGUF loader: time, peak memory, perplexity.

    python benchmarks/gguf_adopt.py memory --steps 3 --json benchmarks/results/gguf-adopt/memory.json
    python benchmarks/gguf_adopt.py perplexity --steps 20 --json benchmarks/results/gguf-adopt/perplexity.json

``memory``: each mode in its own fresh Python process, sampling ``/proc/self/status`` every 10 ms (the Sampler and
model-size accounting of benchmarks/load_memory.py):

- ``adopt``: ``load_gguf(file)`` (the file's Q4_1 blocks become the PEQA base, nothing re-quantized) +
  ``get_peft_model(PeqaConfig(bits=4, group_size=32))`` + ``--steps`` AdamW steps on the scales;
- ``float-then-peqa``: transformers' ``from_pretrained(dir, gguf_file=...)`` (every tensor dequantized to fp32) +
  ``get_peft_model(PeqaConfig(bits=4, group_size=32, init_method="minmax"))`` (re-quantizes the dequantized weights;
  minmax so that the time is not dominated by the MSE clipping search) + the same steps.

Reported per mode: seconds to load (+ get_peft_model), seconds per training step (batch 1 x ``--seq-len`` random
tokens), peak RSS (``VmHWM``) and peak anonymous RSS, each also minus the after-imports baseline. With the default
``PEQA_KERNELS=compiled`` the first steps include torch.compile of each layer shape (minutes on a loaded 2-core
machine); ``PEQA_KERNELS=eager`` measures the uncompiled kernels.

``perplexity``: WikiText-2 test perplexity computed by llama.cpp (benchmarks/gguf_perplexity.py's scorer, same token
windows) of the source file, of our untuned export (byte-identical to it) and of our export after ``--steps`` PEQA
steps on Alpaca (batch 1 x ``--seq-len``), beside the PyTorch perplexity of the tuned PEQA model itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = ("adopt", "float-then-peqa")
MIB = 1 << 20


def _steps(model, steps: int, seq_len: int, seed: int = 0) -> list[float]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    times = []
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=gen)
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    return times


def measure(mode: str, path: Path, steps: int, seq_len: int) -> dict:
    """One mode in this (fresh) process."""
    import torch
    from load_memory import Sampler, model_bytes
    from peft import get_peft_model

    from peqa_peft import PeqaConfig, load_gguf

    sampler = Sampler()
    baseline = sampler.status()
    sampler.start()
    start = time.perf_counter()
    if mode == "adopt":
        model = load_gguf(path)
        config = PeqaConfig(bits=4, group_size=32, task_type="CAUSAL_LM")
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        config = PeqaConfig(bits=4, group_size=32, init_method="minmax", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    load_seconds = time.perf_counter() - start
    load_peak = Sampler.status()["VmHWM"]
    step_times = _steps(model, steps, seq_len)
    sampler.running = False
    sampler.join()
    final = sampler.status()
    return {
        "mode": mode,
        "load_seconds": round(load_seconds, 1),
        "step_seconds": [round(t, 2) for t in step_times],
        "baseline_rss": baseline["VmRSS"],
        "baseline_anon": baseline["RssAnon"],
        "peak_rss_after_load": load_peak,
        "peak_rss": final["VmHWM"],
        "peak_anon": max(sampler.peak["RssAnon"], final["RssAnon"]),
        "model_bytes": model_bytes(model),
    }


def memory_report(results: list[dict]) -> str:
    rows = [
        "| mode | load + get_peft_model (s) | median step (s) | model bytes (MiB) | peak RSS (MiB) "
        "| peak RSS - after-imports (MiB) | peak anon RSS - after-imports (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        steps = sorted(r["step_seconds"])
        median = steps[len(steps) // 2] if steps else float("nan")
        rows.append(
            f"| {r['mode']} | {r['load_seconds']} | {median} | {r['model_bytes']['total'] / MIB:.0f} "
            f"| {r['peak_rss'] / MIB:.0f} | {(r['peak_rss'] - r['baseline_rss']) / MIB:.0f} "
            f"| {(r['peak_anon'] - r['baseline_anon']) / MIB:.0f} |"
        )
    return "\n".join(rows)


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def tune(peft_model, tokenizer, steps: int, seq_len: int, lr: float) -> tuple[list[float], float]:
    """``steps`` AdamW steps on the PEQA scales, batch 1 x ``seq_len`` tokens of Alpaca; (losses, seconds)."""
    import torch

    from peqa_peft.workflows.data import format_alpaca

    rows = json.loads((Path(__file__).resolve().parents[1] / "assets/data/alpaca_data_5000.json").read_text())
    texts = [(lambda r: r["prompt"] + r["completion"])(format_alpaca(row)) for row in rows[: steps * 4]]
    stream = tokenizer("\n\n".join(texts)).input_ids
    if len(stream) < steps * seq_len:
        raise ValueError(f"{steps} steps x {seq_len} tokens need more Alpaca text than {len(rows)} rows hold")
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    peft_model.train()
    start = time.perf_counter()
    losses = []
    for step in range(steps):
        ids = torch.tensor([stream[step * seq_len : (step + 1) * seq_len]])
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(round(loss.item(), 3))
    return losses, time.perf_counter() - start


def scale_change(model) -> dict:
    """How far tuning moved the scales: |Δs|/|s0| (mean, max) and the share of scales whose fp16 value (what a GGUF
    block stores) differs from the untuned one."""
    rel_sum, count, rel_max, changed = 0.0, 0, 0.0, 0
    for module in model.modules():
        if not getattr(module, "peqa_scale", None):
            continue
        s0 = module.get_base_layer().scale.float()
        delta = sum(p.detach().float() for p in module.peqa_scale.values())
        rel = delta.abs() / s0.abs().clamp_min(1e-12)
        rel_sum += rel.sum().item()
        count += rel.numel()
        rel_max = max(rel_max, rel.max().item())
        changed += (s0.half() != (s0 + delta).half()).sum().item()
    return {"scales": count, "mean_rel": rel_sum / count, "max_rel": rel_max, "fp16_changed": changed / count}


def llama_cpp_ppl(files: dict[str, Path], windows: list[list[int]], threads: int, tmp: Path) -> dict[str, dict]:
    """WikiText-2 perplexity of each file by llama.cpp in a separate process that never imports peqa_peft."""
    (tmp / "windows.json").write_text(json.dumps(windows))
    script = Path(__file__).resolve().parent / "llama_cpp_score.py"
    cmd = [sys.executable, str(script), "nll", *map(str, files.values()), "--windows", str(tmp / "windows.json")]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([*cmd, "--threads", str(threads)], capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise RuntimeError(f"llama_cpp_score failed:\n{out.stderr[-3000:]}")
    scores = json.loads(out.stdout.strip().splitlines()[-1])
    return {name: score for name, score in zip(files, scores)}


def perplexity(
    path: Path,
    steps: int,
    seq_len: int,
    max_tokens: int,
    lr: float,
    k_quants: list[str],
    threads: int,
    train_seq_len: int,
) -> dict:
    """Tune ``steps`` PEQA steps on Alpaca; WikiText-2 perplexity of the PEQA model (PyTorch) and of its GGUF exports
    (llama.cpp, a process without peqa_peft), tuned and untuned, on the same token windows."""
    import numpy as np
    from gguf_perplexity import dense_check, dense_forward, torch_nll
    from peft import get_peft_model

    from peqa_peft import PeqaConfig, load_gguf, load_gguf_tokenizer
    from peqa_peft.integrations.formats import export
    from peqa_peft.workflows.evaluate import load_eval_text

    model = load_gguf(path)
    tokenizer = load_gguf_tokenizer(model)
    tokens = tokenizer(load_eval_text("wikitext2")).input_ids[:max_tokens]
    windows = [tokens[i : i + seq_len] for i in range(0, len(tokens) - seq_len + 1, seq_len)]
    result = {"windows": len(windows), "seq_len": seq_len, "tokens": len(windows) * seq_len, "steps": steps, "lr": lr}
    result["train_seq_len"] = train_seq_len
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        # untuned first: the adopted model with a zero delta, exported (byte-identical to the source file)
        untuned_model = get_peft_model(model, PeqaConfig(adopt_checkpoint_grid=True, task_type="CAUSAL_LM"))
        untuned_model.eval()
        _log("untuned PEQA perplexity")
        with dense_forward(untuned_model):
            result["ppl_untuned_peqa_pytorch"] = float(np.exp(torch_nll(untuned_model, windows)))
        untuned = export(untuned_model, tmp / "untuned", format="gguf") / "model.gguf"
        result["untuned_export_identical_to_source"] = untuned.read_bytes() == path.read_bytes()
        model = untuned_model.unload()

        peft_model = get_peft_model(model, PeqaConfig(adopt_checkpoint_grid=True, task_type="CAUSAL_LM"))
        _log("tuning")
        losses, seconds = tune(peft_model, tokenizer, steps, train_seq_len, lr)
        result.update(train_seconds=round(seconds, 1), losses=losses)
        result["scale_change"] = scale_change(peft_model)
        peft_model.eval()
        _log("tuned PEQA perplexity")
        with dense_forward(peft_model):
            result["ppl_tuned_peqa_pytorch"] = float(np.exp(torch_nll(peft_model, windows)))
        _log("dense vs PEQA forward check")
        result["dense_vs_peqa_forward_max_abs_logit_diff"] = dense_check(peft_model, windows[0][:32])
        files = {"source": path, "untuned_export": untuned}
        summaries = {}
        for mode in k_quants:
            out = export(peft_model, tmp / f"tuned-{mode}", format="gguf", k_quants=mode)
            files[f"tuned_export_{mode}"] = out / "model.gguf"
            summaries[mode] = json.loads((out / "gguf_export.json").read_text())
            summaries[mode]["bytes"] = (out / "model.gguf").stat().st_size
        result["tuned_export_summary"] = summaries
        result["source_bytes"] = path.stat().st_size
        _log("llama.cpp perplexity")
        result["llama_cpp"] = llama_cpp_ppl(files, windows, threads, tmp)
    cpp = result["llama_cpp"]
    result["gap_untuned"] = cpp["untuned_export"]["ppl"] / result["ppl_untuned_peqa_pytorch"] - 1
    for mode in k_quants:
        result[f"gap_tuned_{mode}"] = cpp[f"tuned_export_{mode}"]["ppl"] / result["ppl_tuned_peqa_pytorch"] - 1
    return result


def perplexity_report(r: dict) -> str:
    """Markdown table of one ``perplexity`` result."""
    sc = r["scale_change"]
    lines = [
        f"{r['windows']} windows x {r['seq_len']} tokens of WikiText-2 test ({r['tokens']} tokens), {r['steps']} PEQA "
        f"steps (AdamW lr {r['lr']}, batch 1 x {r['train_seq_len']} Alpaca tokens; losses {r['losses'][0]} -> "
        f"{r['losses'][-1]}). Scales moved by |Δs|/|s0| = {sc['mean_rel']:.2e} mean, {sc['max_rel']:.2e} max; "
        f"{100 * sc['fp16_changed']:.1f}% of the {sc['scales']} scales have a different fp16 value than before "
        "tuning. Untuned export byte-identical to the source file: "
        f"{r['untuned_export_identical_to_source']}. PyTorch perplexities use each layer's weight s * (q - z) "
        "dequantized once (benchmarks/gguf_perplexity.py's dense_forward; max |logit diff| to the PEQA forward on "
        f"32 tokens: {r['dense_vs_peqa_forward_max_abs_logit_diff']:.2e}).",
        "",
        "| model | PEQA in PyTorch | GGUF in llama.cpp | llama.cpp / PyTorch - 1 | file bytes |",
        "|---|---:|---:|---:|---:|",
        f"| source file | | {r['llama_cpp']['source']['ppl']:.4f} | | {r['source_bytes']:,} |",
        f"| adopted, untuned (export = source) | {r['ppl_untuned_peqa_pytorch']:.4f} "
        f"| {r['llama_cpp']['untuned_export']['ppl']:.4f} | {100 * r['gap_untuned']:+.3f}% | {r['source_bytes']:,} |",
    ]
    for mode, summary in r["tuned_export_summary"].items():
        lines.append(
            f'| tuned, `k_quants="{mode}"` | {r["ppl_tuned_peqa_pytorch"]:.4f} '
            f"| {r['llama_cpp'][f'tuned_export_{mode}']['ppl']:.4f} | {100 * r[f'gap_tuned_{mode}']:+.3f}% "
            f"| {summary['bytes']:,} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("memory", "perplexity"))
    parser.add_argument("--model", default="smollm2-135m", help="a zoo name or a .gguf path")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--train-seq-len", type=int, default=128, help="perplexity: tokens per tuning step")
    parser.add_argument("--k-quants", nargs="+", default=["exact"], choices=("exact", "requantize"))
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads")
    parser.add_argument("--md", type=Path, help="perplexity: also write the markdown table here")
    parser.add_argument("--mode", choices=MODES, help="internal: measure one mode in this process")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from peqa_peft.workflows import model_zoo

    path = Path(args.model) if args.model.endswith(".gguf") else model_zoo.gguf_path(args.model)
    machine = {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version()}
    machine["peqa_kernels"] = os.environ.get("PEQA_KERNELS", "compiled")
    machine["load_average"] = Path("/proc/loadavg").read_text().split()[:3]
    if args.what == "perplexity":
        result = {
            "model": str(path),
            "machine": machine,
            **perplexity(
                path,
                args.steps,
                args.seq_len,
                args.max_tokens,
                args.lr,
                args.k_quants,
                args.threads,
                args.train_seq_len,
            ),
        }
        print(json.dumps(result, indent=1))
        print(perplexity_report(result))
        if args.json:
            args.json.write_text(json.dumps(result, indent=1) + "\n")
        if args.md:
            args.md.write_text(perplexity_report(result) + "\n")
        return
    if args.mode:
        print("RESULT " + json.dumps(measure(args.mode, path, args.steps, args.seq_len)))
        return
    results = []
    for mode in MODES:
        cmd = [sys.executable, __file__, "memory", "--model", str(path), "--mode", mode, "--steps", str(args.steps)]
        cmd += ["--seq-len", str(args.seq_len)]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(f"{mode} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(line[len("RESULT ") :]))
        print(json.dumps(results[-1]), flush=True)
    print(memory_report(results))
    if args.json:
        args.json.write_text(json.dumps({"model": str(path), "machine": machine, "results": results}, indent=1) + "\n")


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
