"""Paired in-process measurements behind two design choices of the PEQA kernels (one torch thread):

1. the fused MSE clipping search (all candidates in one compiled pass) against the candidate loop;
2. the grouped scale gradient: G^T X per block of rows + fused per-group reduction, against a batched matmul over
   groups (X_g @ W0_g^T for every group g).

    python benchmarks/peqa_kernels_micro.py
"""

from __future__ import annotations

import functools
import time

import torch

from peqa_peft.core import QuantLinear, dequantize_packed, kernels, quantizer
from peqa_peft.core import functional as fn

TOKENS, OUT, IN, GROUP = 160, 5632, 2048, 128


def best_ms(fns, n):
    """Best wall time (ms) of each function, calls interleaved so that load changes hit all of them alike."""
    for f in fns:
        f()
    best = [float("inf")] * len(fns)
    for _ in range(n):
        for i, f in enumerate(fns):
            start = time.perf_counter()
            f()
            best[i] = min(best[i], time.perf_counter() - start)
    return [b * 1e3 for b in best]


def search(weight, group_size, mode):
    with kernels.kernels(mode):
        quantizer.compute_qparams(weight, 4, group_size)


def mse_search() -> None:
    weight = torch.randn(OUT, IN)[:1408] * 0.02
    for group_size in (None, GROUP):
        fused = functools.partial(search, weight, group_size, "compiled")
        loop = functools.partial(search, weight, group_size, "eager")
        a, b = best_ms([fused, loop], n=2)
        rate = weight.numel() / 1e3
        print(f"MSE search {tuple(weight.shape)} group={group_size}: fused {rate / a:.1f} M weights/s, ", end="")
        print(f"loop {rate / b:.2f} M weights/s, fused / loop {b / a:.1f}x", flush=True)


def grouped_scale_grad() -> None:
    groups = IN // GROUP
    layer = QuantLinear.from_linear(torch.nn.Linear(IN, OUT), 4, GROUP, method="minmax")
    x, g = torch.randn(TOKENS, IN), torch.randn(TOKENS, OUT)
    k = kernels.plane_width(4, IN, GROUP)
    shape = fn._Layer(4, OUT, IN, k)
    xp = kernels.to_planes(x, k)

    def blocks():
        out = torch.empty(OUT, groups)
        for r0, r1 in shape.blocks:
            dw = g[:, r0:r1].t() @ xp
            codes = shape.codes(layer.qweight, r0, r1)
            out[r0:r1] = kernels.group_dot(dw, codes, layer.zero_point[r0:r1], 4, r1 - r0, IN, k)
        return out

    def bmm():
        out = torch.empty(OUT, groups)
        xg = x.view(TOKENS, groups, GROUP).transpose(0, 1)  # (G, T, group)
        for r0, r1 in shape.blocks:
            ones, zero = torch.ones(r1 - r0, groups), layer.zero_point[r0:r1].float()
            w0 = dequantize_packed(shape.codes(layer.qweight, r0, r1), 4, r1 - r0, IN, ones, zero)
            partial = torch.bmm(xg, w0.view(r1 - r0, groups, GROUP).permute(1, 2, 0))  # (G, T, rows)
            out[r0:r1] = (partial * g[:, r0:r1].unsqueeze(0)).sum(1).t()
        return out

    torch.testing.assert_close(blocks(), bmm(), rtol=1e-3, atol=1e-2)
    a, b = best_ms([blocks, bmm], n=3)
    print(f"grouped dL/ds at {OUT}x{IN}, {TOKENS} tokens, group {GROUP}: ", end="")
    print(f"G^T X blocks {a:.0f} ms, batched matmul over groups {b:.0f} ms", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.manual_seed(0)
    mse_search()
    grouped_scale_grad()
