"""Instruction data for fine-tuning: Alpaca (Hub id or local JSON/JSONL) in TRL's prompt/completion format.

With ``prompt``/``completion`` columns, TRL's ``SFTTrainer`` puts the loss on the completion (the response) only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

BUNDLED_ALPACA = Path(__file__).resolve().parents[2] / "assets" / "data" / "alpaca_data_5000.json"

# The Stanford Alpaca prompt templates (with and without an input field).
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_alpaca(row: dict) -> dict:
    """One Alpaca record (``instruction``, optional ``input``, ``output``) as ``{"prompt", "completion"}``."""
    template = PROMPT_WITH_INPUT if row.get("input") else PROMPT_NO_INPUT
    return {
        "prompt": template.format(instruction=row["instruction"], input=row.get("input") or ""),
        "completion": row["output"],
    }


def looks_like_local_path(source: str) -> bool:
    """Whether ``source`` names a file or folder rather than a Hub id (``owner/name`` or ``name``)."""
    return (
        source.startswith((".", "/", "~"))
        or source.endswith((".json", ".jsonl", ".parquet", ".csv"))
        or source.count("/") > 1
        or Path(source).exists()
    )


def check_columns(columns: list[str], source: str) -> None:
    """Raise a ``ValueError`` unless the columns are Alpaca's or already prompt/completion."""
    if {"prompt", "completion"} <= set(columns) or {"instruction", "output"} <= set(columns):
        return
    raise ValueError(
        f"dataset {source!r} has columns {sorted(columns)}; expected Alpaca columns 'instruction', 'output' "
        "(and optionally 'input') or 'prompt' and 'completion'"
    )


def load_instruction_dataset(
    source: Optional[str] = None, split: str = "train", max_samples: Optional[int] = None, seed: int = 0
):
    """Load Alpaca-style data as a ``datasets.Dataset`` with ``prompt`` and ``completion`` columns.

    Args:
        source: a Hub dataset id (e.g. ``"tatsu-lab/alpaca"``), a local JSON/JSONL file, or ``None`` for the bundled
            5,000-record Alpaca sample.
        max_samples: keep a seeded random subset of this many records.
    """
    from datasets import load_dataset

    source = str(source or BUNDLED_ALPACA)
    if looks_like_local_path(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"dataset file {path} does not exist")
        dataset = _load_local(path, split)
    else:
        dataset = load_dataset(source, split=split)
    check_columns(dataset.column_names, source)
    if len(dataset) == 0:
        raise ValueError(f"dataset {source!r} has no records")
    if max_samples is not None and max_samples < len(dataset):
        dataset = dataset.shuffle(seed=seed).select(range(max_samples))
    if {"prompt", "completion"} <= set(dataset.column_names):
        return dataset.select_columns(["prompt", "completion"])
    return dataset.map(_format_checked(source), with_indices=True, remove_columns=dataset.column_names)


def _load_local(path: Path, split: str):
    """A local JSON/JSONL/CSV/Parquet file as a ``Dataset``; a file ``datasets`` cannot parse is named in the error."""
    from datasets import load_dataset

    builder = {".csv": "csv", ".parquet": "parquet"}.get(path.suffix, "json")
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"dataset file {path} is empty")
    try:
        return load_dataset(builder, data_files=str(path), split=split)
    except Exception as err:  # datasets wraps parser errors in its own types (DatasetGenerationError, ...)
        cause = err.__cause__ or err
        raise ValueError(
            f"dataset file {path} could not be read as {builder}: {' '.join(str(cause).split())}"
        ) from err


def _format_checked(source: str):
    """:func:`format_alpaca` that names the record whose instruction or output is missing or not text."""

    def format_row(row: dict, index: int) -> dict:
        for column in ("instruction", "output"):
            if not isinstance(row.get(column), str):
                raise ValueError(f"dataset {source!r}, record {index}: '{column}' is {row.get(column)!r}, not text")
        return format_alpaca(row)

    return format_row
