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

BUNDLED_DATA = Path(__file__).resolve().parents[2] / "assets" / "data"

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


def load_for_eval(
    model_name: str,
    adapter: Optional[str] = None,
    bits: Optional[int] = None,
    group_size: Optional[Union[int, str]] = "auto",
    quant_method: str = "auto",
    dtype: torch.dtype = torch.float32,
    load_in_4bit: bool = False,
):
    """A model to evaluate: the base, the base quantized to ``bits`` (PEQA's default init), or base + ``adapter``.

    Returns ``(model, tokenizer)``. A PEQA adapter re-quantizes the base exactly as it was trained (its fingerprint
    is checked); ``bits`` alone evaluates the plain quantized base (a fresh, identity PEQA adapter);
    ``load_in_4bit`` loads the base in bitsandbytes NF4 (the base a QLoRA adapter was trained on).
    """
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import peqa_peft  # noqa: F401  (registers the PEFT types)

    from .data import looks_like_local_path
    from .model_zoo import gguf_file

    gguf = gguf_file(model_name)  # a .gguf file or zoo name: loaded with load_gguf (its own blocks adopted)
    for path, what in (() if gguf else ((model_name, "model"),)) + ((adapter, "adapter"),):
        if path and looks_like_local_path(path) and not Path(path).expanduser().exists():
            raise FileNotFoundError(f"{what} directory {path} does not exist")
    if bits and (adapter or load_in_4bit):
        raise ValueError("--bits quantizes the base itself; it cannot be combined with --adapter or --load-in-4bit")
    if gguf is not None:
        from ..integrations.formats.gguf.reader import load_gguf, load_gguf_tokenizer

        if load_in_4bit:
            raise ValueError("--load-in-4bit re-quantizes a float model; a GGUF file is loaded with its own blocks")
        model = load_gguf(gguf, dtype)
        tokenizer = load_gguf_tokenizer(model)
    elif load_in_4bit:
        from .models import load_nf4_model

        tokenizer = AutoTokenizer.from_pretrained(model_name)
        model = load_nf4_model(model_name, dtype)
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_name)
        model = AutoModelForCausalLM.from_pretrained(model_name, dtype=dtype)
    if adapter:
        try:
            model = PeftModel.from_pretrained(model, adapter)
        except RuntimeError as err:  # shape mismatches from load_state_dict
            raise ValueError(f"adapter {adapter} does not fit model {model_name}: {err}") from err
    elif bits:
        config = peqa_peft.PeqaConfig(
            bits=bits, group_size=group_size, init_method=quant_method, adopt_checkpoint_grid=gguf is not None
        )
        model = get_peft_model(model, config)
    return model.eval(), tokenizer


def mmlu_accuracy(
    model,
    tokenizer,
    num_fewshot: int = 5,
    data_dir: Optional[str] = None,
    limit: Optional[int] = None,
    batch_size: int = 8,
    tasks: tuple[str, ...] = ("mmlu",),
) -> dict:
    """5-shot MMLU accuracy of a (PEFT) model object through the lm-eval harness (``pip install lm-eval``).

    ``data_dir`` points at a local copy of the ``cais/mmlu`` dataset repository (the Hub layout, with its README's
    configs); it replaces the Hub id in every task, so the evaluation runs offline. ``limit`` caps the questions per
    subject (for quick checks). Returns ``{"accuracy": ..., "per_task": {...}}``.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError("MMLU evaluation needs the lm-eval harness: pip install 'peqa-peft[eval]'") from err
    task_manager = TaskManager()
    task_dict = lm_eval.tasks.get_task_dict(list(tasks), task_manager) if data_dir is None else None
    if data_dir is not None:
        task_dict = _local_task_dict(list(tasks), task_manager, data_dir)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.evaluate(lm=lm, task_dict=_with_fewshot(task_dict, num_fewshot), limit=limit)
    per_task = {name: metrics["acc,none"] for name, metrics in results["results"].items() if "acc,none" in metrics}
    top = tasks[0] if len(tasks) == 1 else None
    accuracy = per_task.get(top) if top in per_task else sum(per_task.values()) / max(1, len(per_task))
    return {"accuracy": accuracy, "per_task": per_task, "num_fewshot": num_fewshot}


def _local_task_dict(tasks: list[str], task_manager, data_dir: str) -> dict:
    """Load the lm-eval task configs with their dataset path pointed at a local directory."""
    import lm_eval

    if not Path(data_dir).exists():
        raise FileNotFoundError(f"MMLU directory {data_dir} does not exist")
    original = lm_eval.api.task.ConfigurableTask.download

    def download(self, dataset_kwargs=None):
        self.config.dataset_path = str(data_dir)
        self.DATASET_PATH = str(data_dir)
        return original(self, dataset_kwargs)

    lm_eval.api.task.ConfigurableTask.download = download
    try:
        return lm_eval.tasks.get_task_dict(tasks, task_manager)
    finally:
        lm_eval.api.task.ConfigurableTask.download = original


def _with_fewshot(task_dict: dict, num_fewshot: int) -> dict:
    for value in task_dict.values():
        if isinstance(value, dict):
            _with_fewshot(value, num_fewshot)
        elif hasattr(value, "set_config"):
            value.set_config(key="num_fewshot", value=num_fewshot)
    return task_dict
