"""Run ONE benchmark configuration end to end and return its figures as a JSON-able dict.

Order of a run: build (quantize / wrap) -> train ``steps`` Alpaca batches, timing every step and counting the model
states from live tensors -> WikiText-2 perplexity -> save the adapter and time task switches -> turn the model into
its deployable form, count its resident bytes and time generation. The orchestrator (``run.py``) calls this in a
fresh subprocess per configuration so that the process's peak RSS belongs to that configuration alone.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch
from bench_configs import Built, Context, Spec
from bench_measure import (
    dir_bytes,
    gradient_bytes,
    optimizer_bytes,
    peak_memory,
    reset_peak_memory,
    rss_mib,
    sync,
    time_per_token,
    weight_bytes,
)
from torch import nn

from peqa_peft.workflows.evaluate import perplexity


def _release_freed_memory() -> None:
    """Return freed heap to the OS so the next RSS peak is not inflated by earlier, already freed, allocations."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def train(built: Built, batches: list[dict], warmup: int, device: torch.device, n_params: int) -> dict[str, Any]:
    """Train on ``batches``; time the steps after ``warmup``; count model states; peak memory of the timed steps.

    Gradients are counted right after ``backward`` (their peak; 0 in fused mode where each is consumed as soon as
    it is produced), optimizer states right after ``step`` (they exist from the first step on).
    """
    model, optimizer = built.model, built.optimizer
    model.train()
    times, tok_rates, losses, grads = [], [], [], 0
    peak_reset = False
    for i, batch in enumerate(batches):
        if i == warmup:
            _release_freed_memory()
            peak_reset = reset_peak_memory(device)
        batch = _to_device(batch, device)
        sync(device)
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        grads = max(grads, gradient_bytes(model))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        elapsed = time.perf_counter() - start
        losses.append(loss.item())
        if i >= warmup:
            times.append(elapsed)
            tok_rates.append(int(batch["attention_mask"].sum()) / elapsed)
    state = {"weights": weight_bytes(model), "gradients": grads, "optimizer": optimizer_bytes(optimizer)}
    return {
        "state_bytes": state,
        "state_bytes_per_param": {k: v / n_params for k, v in state.items()},
        "step_s": statistics.median(times) if times else None,
        "step_min_s": min(times) if times else None,  # less sensitive to other load on a shared machine
        "tokens_per_s": statistics.median(tok_rates) if tok_rates else None,
        "loss_first": losses[0] if losses else None,
        "loss_last": statistics.fmean(losses[-3:]) if losses else None,
        "peak_reset": peak_reset,
        **peak_memory(device),
    }


def _task_switch(model: nn.Module, tmp: Path, repeats: int = 20) -> dict[str, float]:
    """Load a second adapter from disk (``load_adapter``) and time switching between the two (``set_adapter``)."""
    start = time.perf_counter()
    model.load_adapter(str(tmp), adapter_name="task_b")
    load_s = time.perf_counter() - start
    names = ["task_b", "default"]
    switch_times = []
    for i in range(repeats):
        start = time.perf_counter()
        model.set_adapter(names[i % 2])
        switch_times.append(time.perf_counter() - start)
    model.set_adapter("default")
    model.delete_adapter("task_b")
    return {"adapter_load_ms": load_s * 1e3, "set_adapter_ms": statistics.median(switch_times) * 1e3}


def save_and_switch(built: Built, tmp: Path) -> dict[str, Any]:
    """On-disk size of what this configuration saves, and task-switch times for PEFT adapters."""
    model = built.model
    model.save_pretrained(str(tmp))
    out: dict[str, Any] = {"saved_bytes": dir_bytes(tmp)}
    if built.peft_adapters:
        out.update(_task_switch(model, tmp))
    return out


def deploy(built: Built, prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict[str, Any]:
    """Resident bytes and decode time per token of the deployable model.

    A backend that cannot merge or generate here (e.g. a CPU kernel's shape limits) records the error instead of
    failing the whole configuration.
    """
    try:
        with torch.no_grad():
            model = built.deploy(built.model)
    except Exception as exc:
        model, error = built.model, f"merge failed ({type(exc).__name__}: {str(exc)[:80]}); unmerged model used"
    else:
        error = None
    _release_freed_memory()
    out: dict[str, Any] = {"deploy_bytes": weight_bytes(model), "quant_layer_fraction": _quant_layer_fraction(model)}
    try:
        out["s_per_token"] = time_per_token(model, prompt, new_tokens, repeats)
    except Exception as exc:
        out["s_per_token"] = None
        error = f"{error + '; ' if error else ''}generation failed: {type(exc).__name__}: {str(exc)[:80]}"
    if error:
        out["deploy_error"] = error
    return out


def _quant_layer_fraction(model: nn.Module) -> Optional[float]:
    """Bytes of the packed quantized layers (codes + s0/z0 + bias) over the same layers' fp16 bytes, if any."""
    from peqa_peft import quantized_layer_bytes

    layers = quantized_layer_bytes(model)
    if not layers:
        return None
    return sum(e["total"] - e["adapter"] for e in layers.values()) / (2 * sum(e["numel"] for e in layers.values()))


def _phase(result: dict[str, Any], key: str, since: float) -> float:
    """Record the seconds since ``since`` under ``result["phases"][key]``; return now."""
    now = time.perf_counter()
    result.setdefault("phases", {})[key] = round(now - since, 2)
    return now


def run_spec(spec: Spec, ctx: Context, data: dict[str, Any], opts: dict[str, Any]) -> dict[str, Any]:
    """Every figure of one configuration.

    ``opts``: steps, warmup, eval_seq_len, gen_tokens, gen_repeats, and ``quality`` (default True): False skips the
    perplexity evaluations and the adapter save/switch (speed/memory runs on random-weight models).
    """
    result: dict[str, Any] = {"name": spec.name, "label": spec.label, "family": spec.family}
    reason = spec.skip_reason(ctx)
    if reason:
        return {**result, "skipped": reason}
    quality = opts.get("quality", True)
    torch.manual_seed(0)
    result["rss_start_mib"] = rss_mib()
    start = time.perf_counter()
    built = spec.build(ctx, spec)
    result["build_s"] = time.perf_counter() - start
    if built.quantize_s and built.quantized_weights:
        result.update(quantize_s=built.quantize_s, quant_weights_per_s=built.quantized_weights / built.quantize_s)
    result["notes"] = [n for n in built.notes if n]
    n_params = data["n_params"]
    ids = data["eval_ids"].to(ctx.device)
    seq_len = opts["eval_seq_len"]
    if spec.trains and quality:  # quality before tuning: separates quantization error from what training recovered
        result["ppl_init"] = perplexity(built.model, input_ids=ids, seq_len=seq_len, progress=False).perplexity
    phase = time.perf_counter()
    if spec.trains:
        result["trainable_params"] = sum(p.numel() for p in built.model.parameters() if p.requires_grad)
        result.update(train(built, data["batches"][: opts["steps"]], opts["warmup"], ctx.device, n_params))
    else:
        state = {"weights": weight_bytes(built.model), "gradients": 0, "optimizer": 0}
        result.update(state_bytes=state, state_bytes_per_param={k: v / n_params for k, v in state.items()})
    phase = _phase(result, "train_s", phase)
    result["ppl"] = None
    if quality:
        result["ppl"] = perplexity(built.model, input_ids=ids, seq_len=seq_len, progress=False).perplexity
    phase = _phase(result, "eval_s", phase)
    if spec.trains and quality:
        with tempfile.TemporaryDirectory() as tmp:
            result.update(save_and_switch(built, Path(tmp)))
    phase = _phase(result, "save_s", phase)
    prompt = data["eval_ids"][:, :16].to(ctx.device)
    result.update(deploy(built, prompt, opts["gen_tokens"], opts["gen_repeats"]))
    _phase(result, "deploy_s", phase)
    if result.get("deploy_error"):
        result["notes"].append(result["deploy_error"])
    result["total_s"] = time.perf_counter() - start
    return result
