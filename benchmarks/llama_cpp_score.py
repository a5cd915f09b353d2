"""llama.cpp on its own: teacher-forced NLL of token windows, and batch-1 decode time, of GGUF files.

This script never imports peqa_peft (nor torch): the benchmarks run it as a separate process, so that what llama.cpp
reports about our GGUF export is llama.cpp's alone (llama-cpp-python + numpy).

    python benchmarks/llama_cpp_score.py nll FILE.gguf --windows windows.json --threads 1
    python benchmarks/llama_cpp_score.py decode A.gguf B.gguf --tokens 32 --rounds 3 --threads 1

``nll``: ``windows.json`` is a list of token-id lists; every window is evaluated from an empty KV cache with all
logits kept, and the mean next-token NLL (natural log, float64 log-softmax over llama.cpp's float32 logits) is printed
as JSON. ``decode``: each file is loaded once; then, for ``--rounds`` rounds, the files are visited in turn (order
rotated each round so that load drift hits every file alike) and each decodes ``--tokens`` tokens one at a time
(``llama_cpp.Llama.eval`` of one token after a 1-token prompt: a batch-1 decode step, the KV cache growing). Printed:
per file the seconds per token of each round and the median, plus the load average at start and end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from pathlib import Path
from unittest import mock

import numpy as np


def open_llama(path, **kwargs):
    """``llama_cpp.Llama(path, **kwargs)``, without llama.cpp's AMX weight repacking on CPUs that have AMX.

    On AMX machines (Intel Sapphire Rapids and later) llama.cpp repacks Q4_0/Q4_1/Q8_0 weights into an AMX buffer
    whose matmul segfaults or returns garbage on some models (ggml-org/llama.cpp#20824, #16315; it crashes on the
    demo model's Q4_1 export with llama-cpp-python 0.3.36). The model parameter ``use_extra_bufts=False``
    keeps the weights in the plain CPU buffer; llama-cpp-python has no argument for it, so the default model
    parameters are patched while the model loads. Elsewhere the defaults (and their repacking) are kept.
    """
    import llama_cpp

    patch = contextlib.nullcontext()
    if b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info():
        defaults = llama_cpp.llama_model_default_params

        def no_repack():
            params = defaults()
            params.use_extra_bufts = False
            return params

        patch = mock.patch.object(llama_cpp.llama.llama_cpp, "llama_model_default_params", no_repack)
    with patch:
        return llama_cpp.Llama(str(path), verbose=False, **kwargs)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def window_nll(llm, windows: list[list[int]]) -> float:
    """Mean next-token NLL of ``windows`` under an open ``llama_cpp.Llama`` (created with ``logits_all=True``)."""
    total, count = 0.0, 0
    for window in windows:
        llm.reset()
        llm.eval(window)
        logp = _log_softmax(np.array(llm.scores[: len(window)])[:-1])
        total -= logp[np.arange(len(window) - 1), np.array(window[1:])].sum()
        count += len(window) - 1
    return total / count


def nll(path: Path, windows: list[list[int]], threads: int) -> dict:
    seq_len = max(len(w) for w in windows)
    llm = open_llama(path, n_ctx=seq_len, n_batch=seq_len, logits_all=True, n_threads=threads)
    try:
        start = time.perf_counter()
        value = window_nll(llm, windows)
        return {"file": str(path), "nll": value, "ppl": float(np.exp(value)), "seconds": time.perf_counter() - start}
    finally:
        llm.close()


def decode(paths: list[Path], tokens: int, rounds: int, threads: int) -> dict:
    """Seconds per batch-1 decode step of each file, interleaved over ``rounds``."""
    models = [open_llama(p, n_ctx=tokens + 8, n_batch=8, n_threads=threads) for p in paths]
    per_round: dict[str, list[float]] = {str(p): [] for p in paths}
    load = [os.getloadavg()[0]]
    try:
        for r in range(rounds):
            order = list(range(len(paths)))
            order = order[r % len(order) :] + order[: r % len(order)]
            for i in order:
                llm = models[i]
                llm.reset()
                llm.eval([1])  # a 1-token prompt, then one token per step
                start = time.perf_counter()
                for step in range(tokens):
                    llm.eval([(step * 7919) % 1000 + 2])
                per_round[str(paths[i])].append((time.perf_counter() - start) / tokens)
        load.append(os.getloadavg()[0])
    finally:
        for llm in models:
            llm.close()
    return {
        "threads": threads,
        "tokens": tokens,
        "rounds": rounds,
        "load_average_1min": load,
        "seconds_per_token": {p: {"rounds": v, "median": statistics.median(v)} for p, v in per_round.items()},
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("nll", "decode"))
    parser.add_argument("files", type=Path, nargs="+")
    parser.add_argument("--windows", type=Path, help="nll: a JSON list of token-id lists")
    parser.add_argument("--tokens", type=int, default=32, help="decode: tokens per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.what == "nll":
        if args.windows is None:
            parser.error("nll needs --windows")
        windows = json.loads(args.windows.read_text())
        print(json.dumps([nll(p, windows, args.threads) for p in args.files]))
    else:
        print(json.dumps(decode(args.files, args.tokens, args.rounds, args.threads)))


if __name__ == "__main__":
    main()
