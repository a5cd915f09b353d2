"""Measurement helpers of the benchmark: bytes from live tensors, resident memory, timing, generation, adapters.

Everything here measures; nothing estimates. Bytes are counted from the tensors that really hold the data, which
needs care for three kinds of tensors whose ``numel() * element_size()`` is not their storage:

- QFT's ``QftWeight`` / ``Int8Grad`` report their storage through a ``storage_bytes()`` method (peqa_peft's protocol);
- torchao's low-bit optimizer states (``OptimState8bit``/``4bit``) are traceable wrapper subclasses: their bytes are
  those of the inner tensors named by ``__tensor_flatten__``;
- bitsandbytes' ``Params4bit`` holds packed uint8 data, but its block absmax lives in ``quant_state``, not in a
  parameter or buffer, so it is added per module.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from peqa_peft.core.memory import tensor_bytes  # the package's one byte counter (rules: its docstring)


def _key(tensor: torch.Tensor) -> tuple:
    """Identity of the storage behind ``tensor``, so tied/shared weights are counted once."""
    if hasattr(tensor, "storage_bytes") or hasattr(type(tensor), "__tensor_flatten__"):
        return ("object", id(tensor))
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel(), tensor.dtype)


def _bnb_quant_state_bytes(model: nn.Module) -> int:
    """Bytes of bitsandbytes 4-bit quantization state (block absmax, nested stats) outside parameters/buffers."""
    total = 0
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        while state is not None:
            for attr in ("absmax", "code", "offset"):
                value = getattr(state, attr, None)
                if isinstance(value, torch.Tensor):
                    total += tensor_bytes(value)
            state = getattr(state, "state2", None)
    return total


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer of ``model`` (plus bitsandbytes 4-bit quant state)."""
    seen: set = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = _key(tensor)
        if key not in seen:
            seen.add(key)
            total += tensor_bytes(tensor)
    return total + _bnb_quant_state_bytes(model)


def gradient_bytes(model: nn.Module) -> int:
    """Bytes of the ``.grad`` tensors currently held by ``model``'s parameters."""
    return sum(tensor_bytes(p.grad) for p in model.parameters() if p.grad is not None)


def optimizer_bytes(optimizer: Optional[torch.optim.Optimizer]) -> int:
    """Bytes of every tensor in ``optimizer.state`` (0 before the first step)."""
    if optimizer is None:
        return 0
    return sum(
        tensor_bytes(v) for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)
    )


# ---------------------------------------------------------------- resident memory


def _status_kib(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mib() -> Optional[float]:
    """Current resident set size of this process in MiB (``None`` where /proc is unavailable)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024


def reset_peak_memory(device: torch.device) -> bool:
    """Restart peak tracking: CUDA's allocator peak, and the process's VmHWM (Linux ``clear_refs`` 5).

    Returns whether the RSS peak could be reset; if not, VmHWM is the process-lifetime peak.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory(device: torch.device) -> dict[str, Optional[float]]:
    """Peak RSS (VmHWM, MiB) since :func:`reset_peak_memory`, and CUDA ``max_memory_allocated`` (MiB) on GPU."""
    kib = _status_kib("VmHWM")
    cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"peak_rss_mib": None if kib is None else kib / 1024, "cuda_max_allocated_mib": cuda}


# ---------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    """Wait for queued kernels so wall-clock times are real on GPU (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], Any], repeats: int, device: torch.device, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def time_per_token(model: nn.Module, prompt_ids: torch.Tensor, new_tokens: int, repeats: int) -> float:
    """Seconds per generated token (greedy, KV cache, batch 1), median of ``repeats`` generations after one warm-up.

    The prompt's prefill is timed separately and subtracted, so the figure is the decode cost per token.
    """
    model.eval()
    device = prompt_ids.device
    kwargs = dict(do_sample=False, pad_token_id=0, use_cache=True)

    def prefill() -> None:
        model.generate(prompt_ids, max_new_tokens=1, min_new_tokens=1, **kwargs)

    def decode() -> None:
        model.generate(prompt_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)

    t_prefill = median_time(prefill, repeats, device)
    t_total = median_time(decode, repeats, device)
    return max(t_total - t_prefill, 0.0) / max(new_tokens - 1, 1)


# ---------------------------------------------------------------- files


def dir_bytes(path: os.PathLike, suffixes: Iterable[str] = (".safetensors", ".bin")) -> int:
    """Total size of the weight files (``suffixes``) under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and f.suffix in tuple(suffixes))
