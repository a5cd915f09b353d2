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


def perplexity(path: Path, steps: int, seq_len: int, max_tokens: int, lr: float) -> dict:
    import numpy as np
    import torch
    from gguf_perplexity import llama_cpp_nll, torch_nll
    from peft import get_peft_model

    from peqa_peft import PeqaConfig, load_gguf, load_gguf_tokenizer
    from peqa_peft.integrations.formats import export
    from peqa_peft.workflows.data import format_alpaca
    from peqa_peft.workflows.evaluate import load_eval_text

    model = load_gguf(path)
    tokenizer = load_gguf_tokenizer(model)
    tokens = tokenizer(load_eval_text("wikitext2")).input_ids[:max_tokens]
    windows = [tokens[i : i + seq_len] for i in range(0, len(tokens) - seq_len + 1, seq_len)]
    peft_model = get_peft_model(model, PeqaConfig(bits=4, group_size=32, task_type="CAUSAL_LM"))
    rows = json.loads((Path(__file__).resolve().parents[1] / "assets/data/alpaca_data_5000.json").read_text())
    texts = [(lambda r: r["prompt"] + r["completion"])(format_alpaca(row)) for row in rows[: steps * 4]]
    stream = tokenizer("\n\n".join(texts)).input_ids
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
    train_seconds = time.perf_counter() - start
    peft_model.eval()
    ppl_tuned_torch = float(np.exp(torch_nll(peft_model, windows)))
    result = {"windows": len(windows), "seq_len": seq_len, "tokens": len(windows) * seq_len, "steps": steps}
    result.update(lr=lr, train_seconds=round(train_seconds, 1), losses=losses)
    with tempfile.TemporaryDirectory() as tmp:
        tuned = export(peft_model, Path(tmp) / "tuned", format="gguf")
        result["ppl_source_llama_cpp"] = float(np.exp(llama_cpp_nll(path, windows, seq_len)))
        result["ppl_tuned_export_llama_cpp"] = float(np.exp(llama_cpp_nll(tuned / "model.gguf", windows, seq_len)))
        result["ppl_tuned_peqa_pytorch"] = ppl_tuned_torch
        result["tuned_export_summary"] = json.loads((tuned / "gguf_export.json").read_text())
        peft_model.unload()
        untuned_model = get_peft_model(model, PeqaConfig(bits=4, group_size=32, task_type="CAUSAL_LM"))
        untuned = export(untuned_model, Path(tmp) / "untuned", format="gguf")
        result["untuned_export_identical_to_source"] = (untuned / "model.gguf").read_bytes() == path.read_bytes()
        result["ppl_untuned_export_llama_cpp"] = float(np.exp(llama_cpp_nll(untuned / "model.gguf", windows, seq_len)))
        result["ppl_untuned_peqa_pytorch"] = float(np.exp(torch_nll(untuned_model, windows)))
        untuned_model.unload()
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("memory", "perplexity"))
    parser.add_argument("--model", default="smollm2-135m", help="a zoo name or a .gguf path")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=1e-4)
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
            **perplexity(path, args.steps, args.seq_len, args.max_tokens, args.lr),
        }
        print(json.dumps(result, indent=1))
        if args.json:
            args.json.write_text(json.dumps(result, indent=1) + "\n")
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
