"""Peak memory of quantize-while-loading vs "load fp32, then get_peft_model" on a >= 1B-parameter Llama.

    python benchmarks/load_memory.py --dir /tmp/llama-1b          # writes the checkpoint once (4.4 GB), then measures

The checkpoint is Llama-shaped with random weights (hidden 2048, intermediate 5632, 22 layers, vocab 32000: 1.10B
parameters, fp32), written shard by shard by this script into ``--dir`` (never committed; delete it afterwards).
Each measurement runs in its own fresh Python process, which samples ``/proc/self/status`` every 10 ms:

- ``peqa-load``: ``from_pretrained(dir, quantization_config=PeqaQuantizationConfig(bits=4))`` then
  ``get_peft_model(model, PeqaConfig(bits=4))`` (which adopts the packed layers);
- ``fp32-then-peqa``: ``from_pretrained(dir)`` in fp32, then ``get_peft_model(model, PeqaConfig(bits=4))``.

Reported: the process's RSS after imports (interpreter + torch + transformers), its peak RSS (``VmHWM``) and peak
anonymous RSS (``RssAnon``: memory the process allocated, without the pages of the memory-mapped checkpoint file,
which the kernel can drop at any time), each also minus the after-imports baseline; and the bytes of the loaded model
(packed codes + s0 + z0 of the quantized linears, float embeddings, head and norms). The issue's target is
peak <= 1.25 x model bytes. Both modes use ``init_method="minmax"`` so that the 1B run takes minutes, not an hour of
clipping search on 2 cores; the MSE search works one layer at a time in bounded chunks and does not change the picture.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, vocab_size=32000),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3, vocab_size=1000),  # smoke test
}
MODES = ("peqa-load", "fp32-then-peqa")
MIB = 1 << 20


def write_checkpoint(directory: Path, shape: dict, layers_per_shard: int = 4) -> None:
    """A random Llama checkpoint of ``shape``, one shard at a time (never the whole model in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from peqa_peft.core.memory import tensor_bytes  # the package's one byte counter (plain tensors here)

    config = LlamaConfig(
        **shape, num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048, dtype="float32"
    )
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    n_layers = shape["num_hidden_layers"]
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * 0.02

    def layer(n):
        p = f"model.layers.{n}."
        return {
            p + "input_layernorm.weight": torch.ones(h),
            p + "post_attention_layernorm.weight": torch.ones(h),
            **{p + f"self_attn.{x}_proj.weight": rand(h, h) for x in "qkvo"},
            p + "mlp.gate_proj.weight": rand(i, h),
            p + "mlp.up_proj.weight": rand(i, h),
            p + "mlp.down_proj.weight": rand(h, i),
        }

    groups = [list(range(s, min(s + layers_per_shard, n_layers))) for s in range(0, n_layers, layers_per_shard)]
    shards = [{"model.embed_tokens.weight": rand(v, h)}] + [None] * len(groups) + [None]
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map, total = {}, 0
    for k, name in enumerate(names):
        if k == 0:
            tensors = shards[0]
        elif k <= len(groups):
            tensors = {key: t for n in groups[k - 1] for key, t in layer(n).items()}
        else:
            tensors = {"model.norm.weight": torch.ones(h), "lm_head.weight": rand(v, h)}
        save_file(tensors, directory / name, metadata={"format": "pt"})
        total += sum(tensor_bytes(t) for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


class Sampler(threading.Thread):
    """Peak RssAnon / VmRSS of this process, sampled every 10 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = {"RssAnon": 0, "VmRSS": 0}
        self.running = True

    @staticmethod
    def status() -> dict[str, int]:
        fields = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                fields[key] = int(value.split()[0]) * 1024
        return fields

    def run(self) -> None:
        while self.running:
            now = self.status()
            for key in self.peak:
                self.peak[key] = max(self.peak[key], now[key])
            time.sleep(0.01)


def model_bytes(model) -> dict[str, int]:
    from peqa_peft import QuantLinear
    from peqa_peft.core.memory import tensor_bytes  # the package's one byte counter

    packed = float_bytes = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            packed += sum(module.memory_bytes().values())
    seen = set()
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.data_ptr() in seen or ".qweight" in name or name.endswith((".scale", ".zero_point")):
            continue
        if "base_layer.bias" in name:
            continue  # counted with its QuantLinear
        seen.add(tensor.data_ptr())
        float_bytes += tensor_bytes(tensor)
    return {"packed_linears": packed, "float_rest": float_bytes, "total": packed + float_bytes}


def measure(mode: str, directory: Path) -> dict:
    """Run one mode in this (fresh) process and return its memory figures."""
    import torch  # noqa: F401
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from peqa_peft import PeqaConfig, PeqaQuantizationConfig

    sampler = Sampler()
    baseline = sampler.status()
    sampler.start()
    start = time.perf_counter()
    if mode == "peqa-load":
        qconfig = PeqaQuantizationConfig(bits=4, init_method="minmax")
        model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=qconfig)
    else:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype="float32")
    model = get_peft_model(model, PeqaConfig(bits=4, init_method="minmax", task_type="CAUSAL_LM"))
    seconds = time.perf_counter() - start
    sampler.running = False
    sampler.join()
    final = sampler.status()
    sizes = model_bytes(model)
    return {
        "mode": mode,
        "seconds": round(seconds, 1),
        "baseline_rss": baseline["VmRSS"],
        "peak_rss": final["VmHWM"],
        "peak_anon": max(sampler.peak["RssAnon"], final["RssAnon"]),
        "baseline_anon": baseline["RssAnon"],
        "final_rss": final["VmRSS"],
        "model_bytes": sizes,
    }


def report(results: list[dict]) -> str:
    rows = [
        "| mode | load + get_peft_model (s) | model bytes (MiB) | peak RSS (MiB) | peak RSS − after-imports (MiB) "
        "| ratio to model | peak anon RSS − after-imports (MiB) | ratio to model |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        model = r["model_bytes"]["total"]
        rss = r["peak_rss"] - r["baseline_rss"]
        anon = r["peak_anon"] - r["baseline_anon"]
        rows.append(
            f"| {r['mode']} | {r['seconds']} | {model / MIB:.0f} | {r['peak_rss'] / MIB:.0f} | {rss / MIB:.0f} "
            f"| {rss / model:.2f} | {anon / MIB:.0f} | {anon / model:.2f} |"
        )
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/peqa-llama-1b"))
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--mode", choices=MODES, help="internal: measure one mode in this process")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args(argv)
    if args.mode:
        print("RESULT " + json.dumps(measure(args.mode, args.dir)))
        return
    if not (args.dir / "model.safetensors.index.json").exists():
        print(f"writing the random {args.shape} checkpoint to {args.dir} ...", flush=True)
        write_checkpoint(args.dir, SHAPES[args.shape])
    results = []
    for mode in MODES:
        cmd = [sys.executable, __file__, "--dir", str(args.dir), "--mode", mode]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(f"{mode} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(line[len("RESULT ") :]))
        print(json.dumps(results[-1]), flush=True)
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
