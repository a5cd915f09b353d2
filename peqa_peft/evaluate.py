"""Perplexity evaluation with the protocol of GPTQ / PEQA (non-overlapping windows over the joined test split).

The evaluation text is tokenized once as a whole, cut into non-overlapping windows of ``seq_len`` tokens (a shorter
tail is dropped), and every window is scored independently: the first token of a window is context only, the other
``seq_len - 1`` are predicted. Perplexity is ``exp(total NLL / number of predicted tokens)``.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from tqdm.auto import tqdm

BUNDLED_DATA = Path(__file__).resolve().parents[1] / "assets" / "data"

# name -> (Hub dataset args, text column, bundled file)
EVAL_SETS = {
    "wikitext2": (("wikitext", "wikitext-2-raw-v1"), "text", "wikitext2_test.raw.txt"),
    "ptb": (("ptb_text_only", "penn_treebank"), "sentence", "ptb_test.txt"),
}


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float
    tokens: int
    windows: int
    seq_len: int

    def to_dict(self) -> dict:
        return asdict(self)


def load_eval_text(name: str, data_dir: Optional[Union[str, os.PathLike]] = None) -> str:
    """The test split of ``name`` ("wikitext2" or "ptb") as one string, joined the way GPTQ/PEQA join it.

    Looks for the bundled copy (or ``data_dir``) first and falls back to the Hub dataset via ``datasets``.
    """
    if name not in EVAL_SETS:
        raise ValueError(f"unknown evaluation set {name!r}; choose one of {sorted(EVAL_SETS)} or pass a text file")
    hub_args, column, filename = EVAL_SETS[name]
    local = Path(data_dir or BUNDLED_DATA) / filename
    if local.exists():
        text = local.read_text(encoding="utf-8").replace("\r\n", "\n")
        # wikitext is joined with blank lines; PTB sentences with single spaces (the GPTQ convention)
        return text if name == "wikitext2" else " ".join(line.strip() for line in text.splitlines())
    if data_dir is not None:
        raise FileNotFoundError(f"{local} not found (expected the {name} test split there)")
    from datasets import load_dataset

    rows = load_dataset(*hub_args, split="test")[column]
    return "\n\n".join(rows) if name == "wikitext2" else " ".join(rows)


def default_seq_len(model) -> int:
    """The context length used when none is given: the model's maximum, capped at 2048 (the papers' setting)."""
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 2048
    return min(2048, int(max_pos))


@torch.no_grad()
def perplexity(
    model,
    tokenizer=None,
    text: Optional[str] = None,
    input_ids: Optional[torch.Tensor] = None,
    seq_len: Optional[int] = None,
    max_tokens: Optional[int] = None,
    batch_size: int = 8,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` (tokenized with ``tokenizer``) or on ready ``input_ids``.

    Args:
        seq_len: window length; defaults to :func:`default_seq_len`. Must not exceed the model's context.
        max_tokens: evaluate only the first ``max_tokens`` tokens (rounded down to whole windows).
        batch_size: windows per forward pass.
    """
    if input_ids is None:
        if tokenizer is None or text is None:
            raise ValueError("pass either `input_ids` or both `tokenizer` and `text`")
        input_ids = tokenizer(text, return_tensors="pt").input_ids
    ids = input_ids.reshape(-1)
    seq_len = seq_len or default_seq_len(model)
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if seq_len < 2 or (max_pos is not None and seq_len > max_pos):
        raise ValueError(f"seq_len={seq_len} must be in [2, {max_pos}] (the model's context length)")
    if max_tokens is not None:
        ids = ids[:max_tokens]
    windows = ids.numel() // seq_len
    if windows == 0:
        raise ValueError(f"need at least seq_len={seq_len} tokens, got {ids.numel()}")
    chunks = ids[: windows * seq_len].view(windows, seq_len)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll = 0.0
    for start in tqdm(range(0, windows, batch_size), desc="perplexity", disable=not progress, unit="batch"):
        batch = chunks[start : start + batch_size].to(device)
        logits = model(input_ids=batch).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
    model.train(was_training)
    count = windows * (seq_len - 1)
    return PerplexityResult(math.exp(total_nll / count), total_nll / count, count, windows, seq_len)
