"""benchmarks/real_models.py's bookkeeping (no real model here): the training check that catches a tuning row that
silently trained nothing, the table order, and the group-size fallback for widths a group does not divide."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import real_models  # noqa: E402

sys.path.remove(str(REPO / "benchmarks"))


def test_training_check_refuses_a_row_that_changed_nothing():
    model = torch.nn.Linear(4, 3)
    before = real_models.state_snapshot(model)
    log = [{"loss": 2.0}, {"loss": 1.5}, {"loss": 1.0}]
    with pytest.raises(RuntimeError, match="no parameter or buffer changed"):
        real_models.training_check(before, model, log)
    with torch.no_grad():
        model.bias.add_(1.0)
    info = real_models.training_check(before, model, log)
    assert info == {"loss_first": 2.0, "loss_last": 1.0, "tensors_changed": "1/2"}


def test_rows_render_as_one_table_in_a_fixed_order(tmp_path):
    row = {"wikitext2": 40.0, "ptb": None, "seconds": 1.0}
    rows = {"tuned-lora": row, "4-g32-mse": row, "tuned-peqa": row, "gguf-adopt": row, "fp32": dict(row, ptb=9.0)}
    rows["2-g32-rtn"] = {"error": "ValueError: boom", "seconds": 2.0}
    results = {"model": "m", "max_tokens": 8, "seq_len": 4, "machine": "cpu", "commands": ["python x"], "rows": rows}
    real_models.render(results, tmp_path / "results.md")
    table = [line.split("|")[1].strip() for line in (tmp_path / "results.md").read_text().splitlines()[-6:]]
    assert table == ["fp32", "gguf-adopt", "4-g32-mse", "2-g32-rtn", "tuned-peqa", "tuned-lora"]
    assert (tmp_path / "results.md").read_text().count("| row |") == 1


@pytest.mark.parametrize(("group", "width", "size"), [("ch", 576, None), ("g64", 576, 64), ("g128", 576, 96)])
def test_group_size_fallback(group, width, size):
    assert real_models.group_size_for(group, width) == size


def test_fallback_note_names_every_group_size():
    model = torch.nn.ModuleDict(
        {"a": torch.nn.Linear(576, 8), "b": torch.nn.Linear(576, 8), "down": torch.nn.Linear(1536, 8)}
    )
    sizes = {n: real_models.group_size_for("g128", w) for n, w in real_models.linear_names(model).items()}
    fallback = {n: s for n, s in sizes.items() if s != 96}
    assert real_models.fallback_note(model, "g128", fallback) == "2 layers at g96, 1 at g128"
