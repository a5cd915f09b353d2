"""QFT + IntLion training step vs fp32 full fine-tuning with torch AdamW, at real layer sizes, in one run.

    python benchmarks/qft_speed.py [--steps 3 --warmup 1 --threads 1 --rounds 1] [--profile qft]
    python benchmarks/qft_speed.py --baseline /path/to/older/checkout --output-dir benchmarks/results/qft-speed

A Llama-shaped model with random weights is built from a config at run time (hidden 2048, intermediate 5632,
32 heads / 4 KV heads, 2 layers, vocab 32000; nothing is downloaded or committed) and trained on random tokens,
batch 1 x 256, for each setting in its own subprocess (so each peak RSS is its own). Reported per setting: median
step time (forward + backward + optimizer step) and peak RSS during training (the high-water mark is reset after the
model is built, so building/quantizing the float model does not count), and the ratios QFT / AdamW, which are what
the targets are about (step <= 1.3x, peak training RSS <= 50%). The optimizer step is also timed on its own
(``update`` column: its share of the step).

Settings: ``adamw`` (fp32 full fine-tuning, torch AdamW), ``qft`` (QFT + IntLion, its default ``kernel="auto"``: the
compiled integer update), ``qft-eager`` (``IntLion(kernel="eager")``: the same update op by op), ``qft-fused``
(``IntLion(fused=True)``). ``--baseline DIR`` adds ``qft-baseline``: the ``qft`` setting with ``peqa_peft`` imported
from another checkout (e.g. the previous commit), so before/after take turns in one run on the same machine state.
``--output-dir`` writes ``results.json`` and ``results.md`` (command, CPU, load average, table) there.

``--profile SETTING`` instead prints torch.profiler's per-op table (time and memory) of one training step.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ("adamw", "qft", "qft-eager", "qft-fused", "qft-baseline")
DEFAULT_SETTINGS = ("adamw", "qft", "qft-fused")
LLAMA_SHAPE = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_attention_heads=32,
    num_key_value_heads=4,
    num_hidden_layers=2,
    vocab_size=32000,
    max_position_embeddings=512,
)


def build(setting: str):
    """``(model, optimizer)`` for ``setting`` on a fresh random Llama-shaped fp32 model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA_SHAPE))
    if setting == "adamw":
        return model, torch.optim.AdamW(model.parameters(), lr=1e-5)
    from peft import get_peft_model

    import peqa_peft  # noqa: F401  (registers QFT)
    from peqa_peft import IntLion, QftConfig

    # QftConfig's default: every parameter trained, like the AdamW reference (embeddings and head integer too).
    model = get_peft_model(model, QftConfig(task_type="CAUSAL_LM"))
    if setting == "qft-baseline":  # an older peqa_peft (--baseline): its IntLion may not know `kernel`
        return model, IntLion.from_model(model, lr=1e-5)
    kernel = "eager" if setting == "qft-eager" else "auto"
    return model, IntLion.from_model(model, lr=1e-5, fused=setting == "qft-fused", kernel=kernel)


def _vm_hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def train_step(model, optimizer, ids) -> float:
    """One step; returns the seconds spent in ``optimizer.step()`` (with fused=True the update runs in backward)."""
    model(input_ids=ids, labels=ids).loss.backward()
    start = time.perf_counter()
    optimizer.step()
    update = time.perf_counter() - start
    optimizer.zero_grad(set_to_none=True)
    return update


def worker(setting: str, steps: int, warmup: int, seq_len: int) -> dict:
    model, optimizer = build(setting)
    ids = torch.randint(0, LLAMA_SHAPE["vocab_size"], (1, seq_len), generator=torch.Generator().manual_seed(0))
    gc.collect()
    _reset_peak_rss()
    times, updates = [], []
    for i in range(warmup + steps):
        start = time.perf_counter()
        update = train_step(model, optimizer, ids)
        if i >= warmup:
            times.append(time.perf_counter() - start)
            updates.append(update)
    return {
        "setting": setting,
        "step_s": statistics.median(times),
        "update_s": statistics.median(updates),
        "peak_rss": _vm_hwm_bytes(),
    }


def profile(setting: str, seq_len: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model, optimizer = build(setting)
    ids = torch.randint(0, LLAMA_SHAPE["vocab_size"], (1, seq_len), generator=torch.Generator().manual_seed(0))
    train_step(model, optimizer, ids)  # warm-up: optimizer state allocated
    with torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        train_step(model, optimizer, ids)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    print(prof.key_averages().table(sort_by="self_cpu_memory_usage", row_limit=15))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1, help="run every setting this many times, in turn")
    parser.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS), choices=SETTINGS)
    parser.add_argument("--profile", choices=SETTINGS, help="print a torch.profiler table of one step instead")
    parser.add_argument("--baseline", help="a checkout whose peqa_peft the qft-baseline setting imports")
    parser.add_argument("--output-dir", help="write results.json and results.md here")
    parser.add_argument("--worker", choices=SETTINGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline and "qft-baseline" not in args.settings:
        args.settings.append("qft-baseline")
    if "qft-baseline" in args.settings and not args.baseline:
        parser.error("the qft-baseline setting needs --baseline DIR")
    torch.set_num_threads(args.threads)
    if args.profile:
        profile(args.profile, args.seq_len)
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.warmup, args.seq_len)))
        return
    runs: dict[str, list[dict]] = {setting: [] for setting in args.settings}
    loads = [os.getloadavg()]
    started = time.time()
    for _ in range(args.rounds):  # settings take turns, so a drift in machine speed hits all of them alike
        for setting in args.settings:
            cmd = [sys.executable, __file__, "--worker", setting, "--steps", str(args.steps)]
            cmd += ["--warmup", str(args.warmup), "--seq-len", str(args.seq_len), "--threads", str(args.threads)]
            env = dict(os.environ)
            if setting == "qft-baseline":
                env["PYTHONPATH"] = str(Path(args.baseline).resolve())
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO, env=env).stdout
            runs[setting].append(json.loads(out.strip().splitlines()[-1]))
            loads.append(os.getloadavg())
    header = (
        f"{args.rounds} round(s) of {args.steps} timed step(s) after {args.warmup} warm-up, {args.threads} thread(s), "
        f"batch 1 x {args.seq_len} tokens"
    )
    lines = [
        "| setting | step (s) | step x AdamW | update (s) | update share of step | peak training RSS (GiB) | "
        "RSS x AdamW |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    base = runs.get("adamw")
    fmt = lambda v, spec=".2f": "-" if v is None else format(v, spec)  # noqa: E731
    summary = {}
    for setting, rs in runs.items():
        step, rss = statistics.median(r["step_s"] for r in rs), statistics.median(r["peak_rss"] for r in rs)
        update = statistics.median(r["update_s"] for r in rs)
        share = None if setting == "qft-fused" else statistics.median(r["update_s"] / r["step_s"] for r in rs)
        # ratios are taken round by round (same machine state), then the median
        ratio_t = statistics.median(r["step_s"] / b["step_s"] for r, b in zip(rs, base)) if base else None
        ratio_m = statistics.median(r["peak_rss"] / b["peak_rss"] for r, b in zip(rs, base)) if base else None
        summary[setting] = dict(step_s=step, update_s=update, update_share=share, step_x_adamw=ratio_t,
                                peak_rss=rss, rss_x_adamw=ratio_m)  # fmt: skip
        lines.append(
            f"| {setting} | {step:.2f} | {fmt(ratio_t)} | {update:.2f} | {fmt(share, '.0%')} | {rss / 2**30:.2f} | "
            f"{fmt(ratio_m)} |"
        )
    print(header)
    print("\n".join(lines))
    if args.output_dir:
        _write_results(Path(args.output_dir), args, header, lines, runs, summary, loads, time.time() - started)


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _write_results(out: Path, args, header: str, lines: list[str], runs, summary, loads, wall: float) -> None:
    """``results.json`` and ``results.md``: the table with the command, machine and load average of the run."""
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/qft_speed.py " + " ".join(sys.argv[1:])
    machine = (
        f"{_cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}; load average (1/5/15 min) at the start "
        f"{'/'.join(f'{v:.1f}' for v in loads[0])}, at the end {'/'.join(f'{v:.1f}' for v in loads[-1])}, "
        f"max 1-min {max(v[0] for v in loads):.1f}"
    )
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    record = dict(command=command, date=date, machine=machine, wall_s=wall, loads=loads, runs=runs, summary=summary,
                  shape=LLAMA_SHAPE, baseline=args.baseline)  # fmt: skip
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    md = [
        "# QFT step time vs fp32 AdamW (Llama-shaped, random weights)",
        "",
        f"Date {date}; command: `{command}`; machine: {machine}; wall time {wall:.0f} s.",
        "",
        header + ". Ratios are taken round by round, then the median; `update` = `optimizer.step()` alone.",
        "",
        *lines,
        "",
    ]
    (out / "results.md").write_text("\n".join(md))


if __name__ == "__main__":
    main()
