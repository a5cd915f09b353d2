"""bf16 decode speed of PEQA 4-bit models in PyTorch: the int4 weight-packed kernel vs today's kernels vs dense.

A Llama-shaped random-weight model (hidden 2048, intermediate 5632, 32 heads / 4 KV heads; ``--layers`` decoder
layers, ``--vocab`` 32000 by default) is built at run time (its outputs mean nothing; speed only). PEQA leaves the
head dense (bf16), so with few layers the head's 65M weights are a large share of each token's bytes: a 22-layer
1.1B model reads ~1B decoder weights per token against the same head. Configs, all in one process, timed
interleaved round after round (the machine is shared: the median over rounds is reported, and the best):

- ``fp32``: the dense fp32 model;
- ``bf16``: the dense model cast to bf16;
- ``peqa4_g<G>_int4``: the PEQA 4-bit model (all linear layers of the decoder, the head stays dense as PEFT's
  all-linear leaves it) cast to bf16, eval + no_grad: PyTorch's int4 matmul (peqa_peft.core.int4mm);
- ``peqa4_g<G>_today``: the same model object with the int4 path switched off (``int4mm.set_enabled(False)``):
  peqa_peft's own packed kernels in bf16, as before;
- ``peqa4_g<G>_head4_int4`` (``--quantize-head``): the head targeted as well (4-bit, int4 kernel).

Batch-1 greedy decode with a KV cache (deploy.py's ``torch_decode``), time per generated token; ratios against
bf16 dense and fp32 dense of the same run. Results: ``<output-dir>/results.json`` and ``results.md`` (command,
machine, load average).

    python benchmarks/bf16_decode.py --output-dir benchmarks/results/bf16-decode [--layers 4 --rounds 5]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from deploy import torch_decode  # noqa: E402

from peqa_peft import PeqaConfig  # noqa: E402
from peqa_peft.core import QuantLinear, int4mm  # noqa: E402

PROMPT_IDS = [1, 415, 2936, 9060, 285, 1142, 10575, 754]  # any ids: the weights are random


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default=str(REPO / "benchmarks" / "results" / "bf16-decode"))
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the hidden-2048 model")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary (the dense bf16 head is read every token)")
    p.add_argument("--group-sizes", default="32,128", help="PEQA group sizes, comma-separated (32 = 'auto')")
    p.add_argument(
        "--quantize-head", action="store_true", help="also a PEQA model whose head is 4-bit too (int4 kernel only)"
    )
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (each decodes every config once)")
    p.add_argument("--rows-sweep", action="store_true", help="also time one layer at 1..128 rows (MAX_ROWS)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the shared machine: 1)")
    return p.parse_args(argv)


def llama_factory(layers: int, vocab: int):
    """A builder of the random-weight hidden-2048 Llama (deploy.py's ``llama_2048_factory`` with a vocab option)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    )

    def build():
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()

    return build


LINEAR_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peqa_model(build, group_size: int, head: bool = False):
    """The PEQA 4-bit model (minmax init: the weights are random, only speed matters) in bf16, eval mode.

    ``head``: quantize the output head too (PEFT's all-linear leaves it out; naming it targets it).
    """
    from peft import get_peft_model

    targets = LINEAR_NAMES + ["lm_head"] if head else "all-linear"
    config = PeqaConfig(bits=4, group_size=group_size, init_method="minmax", target_modules=targets)
    return get_peft_model(build(), config).to(torch.bfloat16).eval()


def rows_sweep(rounds: int, rows=(1, 8, 16, 32, 48, 64, 128)) -> list[dict]:
    """One 2048 x 2048 4-bit layer (group 128), bf16, eval: ms per call of the int4 kernel (forced at every row
    count), today's kernels and the dense bf16 weight, interleaved; what ``int4mm.MAX_ROWS`` was chosen from."""
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(2048, 2048, bias=False), 4, 128, method="minmax").eval()
    dense = layer.dequantize().to(torch.bfloat16)
    limit = int4mm.MAX_ROWS
    out = []
    with torch.no_grad():
        for m in rows:
            x = torch.randn(m, 2048, dtype=torch.bfloat16)
            calls = {
                "int4": lambda x=x: layer(x),
                "today": lambda x=x: layer(x),
                "bf16_dense": lambda x=x: F.linear(x, dense),
            }
            times = {k: [] for k in calls}
            for _ in range(rounds):
                for name, fn in calls.items():
                    int4mm.MAX_ROWS = 1 << 30
                    int4mm.set_enabled(name == "int4")
                    fn()  # warm (compile / cache)
                    start = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - start) * 1000)
            int4mm.MAX_ROWS = limit
            int4mm.set_enabled(True)
            row = {"rows": m, **{f"{k}_ms_median": statistics.median(v) for k, v in times.items()}}
            print(row, flush=True)
            out.append(row)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    build = llama_factory(args.layers, args.vocab)
    fp32 = build()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16).eval()
    models = {"fp32": (fp32, None), "bf16": (bf16, None)}
    for g in (int(v) for v in args.group_sizes.split(",")):
        model = peqa_model(build, g)
        models[f"peqa4_g{g}_int4"] = (model, True)
        models[f"peqa4_g{g}_today"] = (model, False)
        if args.quantize_head:
            models[f"peqa4_g{g}_head4_int4"] = (peqa_model(build, g, head=True), True)

    def run(name: str, n: int) -> tuple[float, list[int]]:
        model, int4 = models[name]
        if int4 is not None:
            int4mm.set_enabled(int4)
        start = time.perf_counter()
        result = torch_decode(model, PROMPT_IDS, n, repeats=1)
        elapsed = time.perf_counter() - start
        int4mm.set_enabled(True)
        return 1000.0 / result["tokens_per_s"], result["tokens"], elapsed

    for name in models:  # warm-up: compiles today's kernels, builds the int4 caches
        run(name, 4)
    cache_bytes = {
        name: sum(m.int4_cache_bytes() for m in model.modules() if isinstance(m, QuantLinear))
        for name, (model, int4) in models.items()
        if int4
    }
    times = {name: [] for name in models}
    tokens = {}
    names = list(models)
    load = [os.getloadavg()]
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate: no config always runs first
        for name in order:
            ms, toks, _ = run(name, args.new_tokens)
            times[name].append(ms)
            tokens[name] = toks
        print(f"round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.1f}" for n in names) + " ms/token", flush=True)
    load.append(os.getloadavg())

    med = {n: statistics.median(v) for n, v in times.items()}
    best = {n: min(v) for n, v in times.items()}
    rows = []
    for n in names:
        rows.append(
            {
                "config": n,
                "ms_per_token_median": med[n],
                "ms_per_token_best": best[n],
                "tokens_per_s_median": 1000.0 / med[n],
                "x_bf16_time": med[n] / med["bf16"],
                "x_fp32_time": med[n] / med["fp32"],
                # the same ratios taken within each round (configs of one round ran seconds apart), then the median
                "x_bf16_time_paired": statistics.median(a / b for a, b in zip(times[n], times["bf16"])),
                "x_fp32_time_paired": statistics.median(a / b for a, b in zip(times[n], times["fp32"])),
                "all_ms_per_token": times[n],
                "int4_cache_bytes": cache_bytes.get(n),
                "greedy_tokens_equal_to_bf16": sum(a == b for a, b in zip(tokens[n], tokens["bf16"])),
            }
        )
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    result = {
        "command": "python benchmarks/bf16_decode.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": args.threads, "torch": torch.__version__},
        "load_average_before_after": load,
        "model": (
            f"Llama-shaped random weights: hidden 2048, intermediate 5632, {args.layers} layers, vocab {args.vocab}"
        ),
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "rows": rows,
    }
    if args.rows_sweep:
        result["rows_sweep"] = rows_sweep(args.rounds)
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# bf16 decode: PEQA 4-bit (int4 kernel / today's kernels) vs dense bf16 / fp32",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {cpu}, {os.cpu_count()} cores (shared), torch {torch.__version__}, {args.threads} thread(s); "
        f"load average before/after {load[0][0]:.1f} / {load[1][0]:.1f}  ",
        f"Model: {result['model']}; batch 1, greedy, {args.new_tokens} new tokens, {args.rounds} interleaved rounds.",
        "",
        "Ratios: of the medians, and (paired) the median over rounds of the ratio within a round.",
        "",
        "| config | ms/token (median) | best | tokens/s | × bf16 dense time | paired | × fp32 dense time | paired |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['config']} | {row['ms_per_token_median']:.1f} | {row['ms_per_token_best']:.1f} | "
            f"{row['tokens_per_s_median']:.1f} | {row['x_bf16_time']:.2f} | {row['x_bf16_time_paired']:.2f} | "
            f"{row['x_fp32_time']:.2f} | {row['x_fp32_time_paired']:.2f} |"
        )
    if args.rows_sweep:
        lines += [
            "",
            "One 2048 x 2048 layer (group 128), ms per call (median), int4 kernel forced at every row count:",
            "",
            "| rows | int4 kernel | today's kernels | bf16 dense |",
            "|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['rows']} | {r['int4_ms_median']:.2f} | {r['today_ms_median']:.2f} | "
            f"{r['bf16_dense_ms_median']:.2f} |"
            for r in result["rows_sweep"]
        ]
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
