"""Markdown tables, target checks and matplotlib plots from the benchmark results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

REF_SPEED = "lora_fp"  # step-time and perplexity reference (LoRA on the float model)
REF_STATE = "full_adamw"  # model-state reference (fp32 AdamW full fine-tuning, 16 B/param)
FP32_ADAMW_BPP = 16.0  # 4 weight + 4 gradient + 8 optimizer bytes per parameter


def _fmt(value: Optional[float], spec: str = ".2f", suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def _rss(r: dict[str, Any]) -> str:
    """Peak RSS of the timed training steps and, in brackets, its excess over the RSS before the model was loaded."""
    peak, start = r.get("peak_rss_mib"), r.get("rss_start_mib")
    if peak is None:
        return "–"
    return f"{peak:.0f} [+{peak - start:.0f}]" if start is not None else f"{peak:.0f}"


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else seconds * 1e3


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or not b else a / b


def _by_name(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in results if "skipped" not in r}


def _total_bpp(r: dict[str, Any]) -> float:
    return sum(r["state_bytes_per_param"].values())


def _state_ref_bpp(done: dict[str, dict[str, Any]]) -> float:
    """Measured fp32 AdamW model state per parameter (16 B/param by construction; measured when it ran)."""
    return _total_bpp(done[REF_STATE]) if REF_STATE in done else FP32_ADAMW_BPP


def memory_table(results: list[dict[str, Any]]) -> list[str]:
    done = _by_name(results)
    ref = _state_ref_bpp(done)
    lines = [
        "| configuration | trainable params | weights B/param | grads B/param | optimizer B/param | total B/param "
        "| % of fp32 AdamW | peak RSS of train steps (MiB) [Δ pre-load] | CUDA max allocated (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in done.values():
        bpp = r["state_bytes_per_param"]
        lines.append(
            f"| {r['label']} | {r.get('trainable_params', 0):,} | {bpp['weights']:.3f} | {bpp['gradients']:.3f} "
            f"| {bpp['optimizer']:.3f} | {_total_bpp(r):.3f} | {100 * _total_bpp(r) / ref:.1f}% "
            f"| {_rss(r)} | {_fmt(r.get('cuda_max_allocated_mib'), '.1f')} |"
        )
    return lines


def speed_table(results: list[dict[str, Any]]) -> list[str]:
    done = _by_name(results)
    lora = done.get(REF_SPEED, {})
    lines = [
        "| configuration | step (ms, median) | step × LoRA-fp | tokens/s | tokens/s × LoRA-fp | decode ms/token "
        "| decode × fp32 | build (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    fp_decode = done.get("fp_ref", {}).get("s_per_token")
    for r in done.values():
        step = r.get("step_s")
        lines.append(
            f"| {r['label']} | {_fmt(step and step * 1e3, '.0f')} | {_fmt(_ratio(step, lora.get('step_s')))} "
            f"| {_fmt(r.get('tokens_per_s'), '.0f')} "
            f"| {_fmt(_ratio(r.get('tokens_per_s'), lora.get('tokens_per_s')))} "
            f"| {_fmt(_ms(r['s_per_token']))} | {_fmt(_ratio(r['s_per_token'], fp_decode))} "
            f"| {_fmt(r.get('build_s'), '.1f')} |"
        )
    return lines


def quality_table(results: list[dict[str, Any]]) -> list[str]:
    done = _by_name(results)
    lora_ppl = done.get(REF_SPEED, {}).get("ppl")
    full_ppl = done.get(REF_STATE, {}).get("ppl")
    fp16_bytes = 2 * next(iter(done.values()))["n_params"] if done else None
    lines = [
        "| configuration | PPL before tuning | WikiText-2 PPL | vs LoRA-fp | vs full AdamW | train loss first→last "
        "| deployed weights (MB) | % of fp16 model | saved (KiB) | load adapter (ms) | set_adapter (ms) | notes |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in done.values():
        loss = f"{r['loss_first']:.2f}→{r['loss_last']:.2f}" if r.get("loss_first") is not None else "–"
        saved = r.get("saved_bytes")
        lines.append(
            f"| {r['label']} | {_fmt(r.get('ppl_init'))} | {r['ppl']:.2f} "
            f"| {_fmt(_pct(r['ppl'], lora_ppl), '+.1f', '%')} "
            f"| {_fmt(_pct(r['ppl'], full_ppl), '+.1f', '%')} | {loss} | {r['deploy_bytes'] / 1e6:.2f} "
            f"| {100 * r['deploy_bytes'] / fp16_bytes:.0f}% | {_fmt(saved and saved / 1024, '.1f')} "
            f"| {_fmt(r.get('adapter_load_ms'), '.1f')} | {_fmt(r.get('set_adapter_ms'), '.3f')} "
            f"| {'; '.join(r.get('notes', []))} |"
        )
    return lines


def _pct(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or not b else 100 * (a / b - 1)


def headline_table(results: list[dict[str, Any]]) -> list[str]:
    """The compact table for the README: one line per configuration, the figures the issue asks for."""
    done = _by_name(results)
    ref = _state_ref_bpp(done)
    lora = done.get(REF_SPEED, {})
    fp16_bytes = 2 * next(iter(done.values()))["n_params"] if done else None
    lines = [
        "| configuration | model state B/param (w+g+opt) | % fp32 AdamW | peak RSS (MiB) [Δ pre-load] "
        "| step × LoRA-fp | decode ms/token | deployed weights % fp16 | WikiText-2 PPL | saved (KiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in done.values():
        bpp = r["state_bytes_per_param"]
        split = f"{_total_bpp(r):.2f} ({bpp['weights']:.2f}+{bpp['gradients']:.2f}+{bpp['optimizer']:.2f})"
        saved = r.get("saved_bytes")
        lines.append(
            f"| {r['label']} | {split} | {100 * _total_bpp(r) / ref:.1f}% | {_rss(r)} "
            f"| {_fmt(_ratio(r.get('step_s'), lora.get('step_s')))} | {_fmt(_ms(r['s_per_token']))} "
            f"| {100 * r['deploy_bytes'] / fp16_bytes:.0f}% | {r['ppl']:.2f} | {_fmt(saved and saved / 1024, '.0f')} |"
        )
    return lines


def skipped_lines(results: list[dict[str, Any]]) -> list[str]:
    return [f"- `{r['name']}` skipped: {r['skipped']}" for r in results if "skipped" in r]


def target_checks(results: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, measured: one line each, MET / MISSED / not measured."""
    done = _by_name(results)
    lines = []

    def check(label: str, value: Optional[float], bound: float, fmt: str, what: str) -> None:
        if value is None:
            lines.append(f"- {label}: not measured ({what} missing)")
            return
        verdict = "MET" if value <= bound else "MISSED"
        lines.append(f"- {label}: {value:{fmt}} (target ≤ {bound:{fmt}}) — **{verdict}**")

    peqa, lora, full = done.get("peqa4"), done.get(REF_SPEED), done.get(REF_STATE)
    fp16 = 2 * peqa["n_params"] if peqa else None
    check("PEQA 4-bit deployed weights / fp16 model", peqa and peqa["deploy_bytes"] / fp16, 0.30, ".1%", "peqa4")
    check("PEQA 4-bit quantized-layer weights / fp16", peqa and peqa.get("quant_layer_fraction"), 0.30, ".1%", "peqa4")
    step_ratio = peqa and lora and peqa["step_s"] / lora["step_s"]
    check("PEQA 4-bit step / LoRA-fp step", step_ratio, 1.3, ".2f", "peqa4/lora")
    check("PEQA 4-bit PPL / LoRA-fp PPL − 1", peqa and lora and peqa["ppl"] / lora["ppl"] - 1, 0.05, "+.1%", "runs")
    p3, r3 = done.get("peqa3"), done.get("rtn3_lora")
    check("PEQA 3-bit PPL / (RTN 3-bit + LoRA) PPL", p3 and r3 and p3["ppl"] / r3["ppl"], 1.0, ".3f", "peqa3/rtn3")
    ref = _state_ref_bpp(done)
    for name, bound in (("qft", 0.21), ("qft_fused", 0.15)):
        q = done.get(name)
        check(f"{name} model state / fp32 AdamW", q and _total_bpp(q) / ref, bound, ".1%", name)
        check(f"{name} PPL / full AdamW PPL − 1", q and full and q["ppl"] / full["ppl"] - 1, 0.05, "+.1%", name)
    return lines


def write_report(results: list[dict[str, Any]], meta: dict[str, Any], out_dir: Path) -> None:
    """``results.json``, ``results.md``, ``README_table.md`` and the PNG plots into ``out_dir``."""
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    header = [
        f"Date {meta['date']}; machine: {meta['machine']}, {meta['threads']} torch threads; "
        f"command: `{meta['command']}`",
        "",
    ]
    settings = ", ".join(f"{k}={v}" for k, v in meta["settings"].items())
    body = [
        "# Benchmark results",
        "",
        *header,
        f"Settings: {settings}. Wall time {meta['wall_s']:.0f} s.",
        "",
        "## Headline",
        "",
        *headline_table(results),
        "",
        "## Targets",
        "",
        *target_checks(results),
        "",
        "## Model-state memory (counted from live tensors after a real optimizer step)",
        "",
        *memory_table(results),
        "",
        "## Speed (ratios to LoRA on the float model, same run)",
        "",
        *speed_table(results),
        "",
        "## Quality, deployment and adapters",
        "",
        *quality_table(results),
        "",
        *(["## Skipped", "", *skipped_lines(results), ""] if skipped_lines(results) else []),
    ]
    (out_dir / "results.md").write_text("\n".join(body) + "\n")
    readme = [*header, *headline_table(results), "", *skipped_lines(results)]
    (out_dir / "README_table.md").write_text("\n".join(readme).rstrip() + "\n")
    write_plots(results, out_dir)


def write_plots(results: list[dict[str, Any]], out_dir: Path) -> None:
    """memory_state.png (stacked bars), step_time_ratio.png, ppl_vs_bytes.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in _by_name(results).values() if r.get("step_s") is not None or r["name"] == "fp_ref"]
    labels = [r["name"] for r in done]
    _memory_plot(plt, done, labels, out_dir / "memory_state.png")
    _speed_plot(plt, [r for r in done if r.get("step_s")], out_dir / "step_time_ratio.png", results)
    _ppl_plot(plt, done, out_dir / "ppl_vs_bytes.png")


def _memory_plot(plt, done: list[dict[str, Any]], labels: list[str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(10, 4.5))
    bottom = [0.0] * len(done)
    for key, color in (("weights", "#4c72b0"), ("gradients", "#dd8452"), ("optimizer", "#55a868")):
        values = [r["state_bytes_per_param"][key] for r in done]
        ax.bar(labels, values, bottom=bottom, label=key, color=color)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("model-state bytes per parameter")
    ax.set_title("Model state (weights + gradients + optimizer), counted from live tensors")
    ax.legend()
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _speed_plot(plt, done: list[dict[str, Any]], path: Path, results: list[dict[str, Any]]) -> None:
    ref = _by_name(results).get(REF_SPEED, {}).get("step_s") or 1.0
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.bar([r["name"] for r in done], [r["step_s"] / ref for r in done], color="#8172b3")
    ax.axhline(1.3, color="red", linestyle="--", label="PEQA target 1.3×")
    ax.set_ylabel("training step time / LoRA-on-fp")
    ax.legend()
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ppl_plot(plt, done: list[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in done:
        x = _total_bpp(r)
        ax.scatter(x, r["ppl"])
        ax.annotate(r["name"], (x, r["ppl"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("model-state bytes per parameter (log)")
    ax.set_ylabel("WikiText-2 perplexity after the same Alpaca steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- speed-only report (--llama-shaped)

REF_QLORA = "qlora_nf4"
REF_FP = "fp_ref"
# Issue 8 measured the MSE clipping search at 1.4 M weights/s on this preset's model before the fused search.
MSE_WEIGHTS_PER_S_BEFORE = 1.4e6


def _mib(r: dict[str, Any]) -> Optional[float]:
    return r.get("peak_rss_mib")


def speed_only_table(results: list[dict[str, Any]]) -> list[str]:
    """Step, tokens/s, decode, peak RSS and quantization speed, each as ratios to the peers of the same run."""
    done = _by_name(results)
    lora, qlora, full, fp = (done.get(n, {}) for n in (REF_SPEED, REF_QLORA, REF_STATE, REF_FP))
    lines = [
        "| configuration | step (ms) | step × LoRA-fp | step × QLoRA | step × full AdamW | tokens/s "
        "| decode ms/token | decode × fp32 | peak RSS (MiB) [Δ pre-load] | RSS × full AdamW "
        "| quantize (s) | quantized weights/s (M) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in done.values():
        step = r.get("step_s")
        rate = r.get("quant_weights_per_s")
        lines.append(
            f"| {r['label']} | {_fmt(step and step * 1e3, '.0f')} | {_fmt(_ratio(step, lora.get('step_s')))} "
            f"| {_fmt(_ratio(step, qlora.get('step_s')))} | {_fmt(_ratio(step, full.get('step_s')))} "
            f"| {_fmt(r.get('tokens_per_s'), '.0f')} | {_fmt(_ms(r.get('s_per_token')))} "
            f"| {_fmt(_ratio(r.get('s_per_token'), fp.get('s_per_token')))} | {_rss(r)} "
            f"| {_fmt(_ratio(_mib(r), _mib(full)))} | {_fmt(r.get('quantize_s'), '.1f')} "
            f"| {_fmt(rate and rate / 1e6, '.1f')} |"
        )
    return lines


def speed_target_checks(results: list[dict[str, Any]]) -> list[str]:
    """Issue 8's speed targets on this run: one line each, MET / MISSED / not measured."""
    done = _by_name(results)
    lines: list[str] = []

    def get(name: str, key: str) -> Optional[float]:
        return done.get(name, {}).get(key)

    def check(label: str, value: Optional[float], bound: float, fmt: str = ".2f", at_least: bool = False) -> None:
        if value is None:
            lines.append(f"- {label}: not measured")
            return
        met = value >= bound if at_least else value <= bound
        sign = "≥" if at_least else "≤"
        lines.append(f"- {label}: {value:{fmt}} (target {sign} {bound:{fmt}}) — **{'MET' if met else 'MISSED'}**")

    check("PEQA 4-bit step / LoRA-fp", _ratio(get("peqa4", "step_s"), get(REF_SPEED, "step_s")), 1.1)
    check("PEQA 4-bit step / QLoRA", _ratio(get("peqa4", "step_s"), get(REF_QLORA, "step_s")), 1.0)
    check("PEQA 4-bit grouped step / LoRA-fp", _ratio(get("peqa4_g", "step_s"), get(REF_SPEED, "step_s")), 1.4)
    check("PEQA 3-bit step / PEQA 4-bit step", _ratio(get("peqa3", "step_s"), get("peqa4", "step_s")), 1.1)
    check("PEQA 4-bit decode / fp32", _ratio(get("peqa4", "s_per_token"), get(REF_FP, "s_per_token")), 1.0)
    check("PEQA 3-bit decode / fp32", _ratio(get("peqa3", "s_per_token"), get(REF_FP, "s_per_token")), 1.2)
    check("QFT step / fp32 AdamW full FT", _ratio(get("qft", "step_s"), get(REF_STATE, "step_s")), 1.3)
    check("QFT peak RSS / fp32 AdamW full FT", _ratio(get("qft", "peak_rss_mib"), get(REF_STATE, "peak_rss_mib")), 0.5)
    # The MSE search runs where the default init is MSE: with groups (init_method="auto"; per channel it is RTN).
    mse = get("peqa4_g", "quant_weights_per_s")
    check(
        "PEQA 4-bit grouped MSE search weights/s (the default init with groups: 191 grid candidates per group) / "
        "1.4 M (issue 8's per-channel search of 80 clipping ratios, before it was fused)",
        mse and mse / MSE_WEIGHTS_PER_S_BEFORE,
        10.0,
        ".1f",
        at_least=True,
    )
    return lines


def write_speed_report(results: list[dict[str, Any]], meta: dict[str, Any], out_dir: Path) -> None:
    """``results.json`` and ``speed.md`` for a speed/memory-only run (no quality, no plots)."""
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    settings = ", ".join(f"{k}={v}" for k, v in meta["settings"].items())
    body = [
        "# Speed and memory at real layer sizes",
        "",
        f"Date {meta['date']}; machine: {meta['machine']}, {meta['threads']} torch threads; "
        f"command: `{meta['command']}`",
        "",
        f"Settings: {settings}. Wall time {meta['wall_s']:.0f} s. Step = forward + backward + optimizer step, median "
        "of the timed steps; decode = greedy batch-1 generation with KV cache, prefill subtracted; quantize = "
        "wrapping the linear layers (QLoRA: loading the checkpoint with bitsandbytes quantization).",
        "",
        *speed_only_table(results),
        "",
        "## Targets (issue 8)",
        "",
        *speed_target_checks(results),
        "",
        *(["## Skipped", "", *skipped_lines(results), ""] if skipped_lines(results) else []),
    ]
    (out_dir / "speed.md").write_text("\n".join(body) + "\n")
