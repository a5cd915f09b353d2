"""Int8 vs float32 gradient all-reduce for QFT under DDP: how much error would int8 communication add?

    python benchmarks/qft_grad_allreduce.py --output-dir benchmarks/results/qft-grad-allreduce

QFT under DDP averages each weight-gradient chunk over the ranks in float32 and then quantizes it to int8 once
(``peqa_peft/tuners/qft/distributed.py``). The alternative the paper's int8 gradients suggest sends int8 codes:
each rank quantizes its own gradient, the ranks exchange codes and row scales, and the average is quantized again
for storage. This measures, on real gradients of the bundled pretrained model (WikiText-2 batches, one micro-batch
per simulated rank, every 2-D weight), what each scheme stores compared with the exact float average:

- ``fp32 all-reduce`` (what QFT does): ``q(mean_r g_r)``;
- ``int8, own scales``: ranks send codes + their per-row scales: ``q(mean_r deq(q(g_r))``;
- ``int8, shared scales``: ranks first agree on each row's largest scale (a tiny max all-reduce), quantize with it
  and sum the codes (in int32: the sums overflow int8): ``q(s * sum_r codes_r / R)``;
- ``int8, sum-safe``: the same with ``127 // R`` levels per rank, so the code sums fit in int8 and travel as int8.

Reported per scheme and rank count: the relative L2 error of the stored gradient, the fraction of entries whose
sign (Lion's first-step direction) differs from the exact average's, and the bytes each rank receives per gradient
entry. The ranks are simulated in one process (the arithmetic is the same; no communication time is measured: gloo
over loopback on a 2-core VM says nothing about real interconnects).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from peqa_peft.core.qft.grad import GRAD_MAXQ, quantize_grad_rows  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "assets" / "data" / "wikitext2_valid.tokens.txt"


def micro_batch_grads(model_path: str, ranks: int, batch: int, seq_len: int) -> list[dict[str, torch.Tensor]]:
    """One gradient per simulated rank (its own micro-batch), for every 2-D weight."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    ids = tokenizer(DATA.read_text(encoding="utf-8"), return_tensors="pt").input_ids.view(-1)
    windows = ids[: ranks * batch * seq_len].view(ranks, batch, seq_len)
    grads = []
    for rank in range(ranks):
        model.zero_grad(set_to_none=True)
        model(input_ids=windows[rank], labels=windows[rank]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and p.dim() == 2})
    return grads


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale


def store(g: torch.Tensor) -> torch.Tensor:
    """What QFT stores for a float gradient: int8 codes with per-row scales (dequantized for comparison)."""
    return dequantize(*quantize_grad_rows(g))


def _shared_codes(rank_grads: list[torch.Tensor], levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank's gradient on a grid shared by all ranks (each row's largest scale): summed codes and the scale."""
    scale = torch.stack([g.abs().amax(dim=1, keepdim=True) for g in rank_grads]).amax(0) / levels
    scale = scale.clamp_min(torch.finfo(torch.float32).tiny)
    codes = sum(torch.div(g, scale).round().clamp(-levels, levels).to(torch.int32) for g in rank_grads)
    return codes, scale


def schemes(rank_grads: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The stored gradient of each all-reduce scheme for one weight."""
    n = len(rank_grads)
    own = torch.stack([store(g) for g in rank_grads]).mean(0)
    shared, shared_scale = _shared_codes(rank_grads, GRAD_MAXQ)
    safe, safe_scale = _shared_codes(rank_grads, GRAD_MAXQ // n)  # sums of n codes stay within int8
    return {
        "fp32 all-reduce": store(sum(rank_grads) / n),
        "int8, own scales": store(own),
        "int8, shared scales": store(shared.float() * shared_scale / n),
        "int8, sum-safe": store(safe.float() * safe_scale / n),
    }


def bytes_per_entry(name: str, rows: int, cols: int, ranks: int) -> float:
    """Bytes each rank receives per gradient entry (bandwidth-optimal ring collectives; NCCL's types).

    - fp32: a ring all-reduce, ``2 (R-1)/R * 4``.
    - own scales: codes with different scales cannot be summed in transit, so an all-gather of codes + row
      scales, ``(R-1) * (1 + 4/cols)``.
    - shared scales (full 127 levels per rank): the code sums overflow int8 and NCCL has no int16, so an int32
      ring all-reduce, ``2 (R-1)/R * 4``, plus a max all-reduce of the row scales.
    - sum-safe: each rank uses ``127 // R`` levels so the sums fit int8: an int8 ring all-reduce, ``2 (R-1)/R``,
      plus the row maxima.
    """
    ring = 2 * (ranks - 1) / ranks
    scales = ring * 4 / cols
    return {
        "fp32 all-reduce": ring * 4,
        "int8, own scales": (ranks - 1) * (1 + 4 / cols),
        "int8, shared scales": ring * 4 + scales,
        "int8, sum-safe": ring * 1 + scales,
    }[name]


def measure(grads: list[dict[str, torch.Tensor]], ranks: int) -> list[dict]:
    """Error of each scheme against the exact float average, pooled over all weights, for ``ranks`` ranks."""
    totals: dict[str, dict[str, float]] = {}
    for name in grads[0]:
        rank_grads = [g[name] for g in grads[:ranks]]
        exact = sum(rank_grads) / ranks
        for scheme, stored in schemes(rank_grads).items():
            t = totals.setdefault(scheme, {"err2": 0.0, "ref2": 0.0, "flips": 0, "entries": 0, "bytes": 0.0})
            t["err2"] += float((stored - exact).square().sum())
            t["ref2"] += float(exact.square().sum())
            t["flips"] += int((stored.sign() != exact.sign()).sum())
            t["entries"] += exact.numel()
            t["bytes"] += bytes_per_entry(scheme, *exact.shape, ranks) * exact.numel()
    return [
        {
            "ranks": ranks,
            "scheme": scheme,
            "rel_l2_error": (t["err2"] / t["ref2"]) ** 0.5,
            "sign_flips": t["flips"] / t["entries"],
            "bytes_per_entry": t["bytes"] / t["entries"],
        }
        for scheme, t in totals.items()
    ]


def report(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"`python benchmarks/qft_grad_allreduce.py {' '.join(args.argv)}` on {platform.node() or 'this machine'} "
        f"({os.cpu_count()} CPUs, torch {torch.__version__}); demo model, every 2-D weight, one micro-batch of "
        f"{args.batch} x {args.seq_len} WikiText-2 tokens per simulated rank.",
        "",
        "| ranks | scheme | rel. L2 error of the stored gradient | sign flips vs exact | bytes received / entry |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['ranks']} | {r['scheme']} | {r['rel_l2_error']:.4f} | {r['sign_flips']:.4%} | "
            f"{r['bytes_per_entry']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "assets" / "demo-llama"))
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--output-dir")
    args = parser.parse_args(argv)
    if min(args.ranks) < 1 or args.batch < 1 or args.seq_len < 2:
        parser.error("--ranks and --batch must be positive and --seq-len at least 2")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    grads = micro_batch_grads(args.model, max(args.ranks), args.batch, args.seq_len)
    rows = [row for ranks in args.ranks for row in measure(grads, ranks)]
    text = report(rows, args)
    print(text)
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
        (out / "results.md").write_text(text)


if __name__ == "__main__":
    main()
