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


def test_gptq_hessian_weights_each_windows_first_token():
    """``collect_hessians(sink_weight=w)``: H = 2/n * sum_t w_t x_t x_t^T over the layer's inputs, the first token of
    every window weighted w (the attention sink; see the benchmark's docstring), n = the sum of the weights."""
    from conftest import tiny_llama

    model = tiny_llama(vocab_size=64).eval()
    ids = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(0))
    name = "model.layers.0.mlp.down_proj"
    inputs = []
    hook = model.get_submodule(name).register_forward_hook(lambda m, a, o: inputs.append(a[0][0].detach()))
    with torch.no_grad():
        for window in ids:
            model(input_ids=window[None])
    hook.remove()
    x = torch.cat(inputs)  # (3 * 8, in_features)
    weights = torch.ones(3, 8)
    weights[:, 0] = 16.0
    weights = weights.reshape(-1, 1)
    expected = 2 * (x * weights).t() @ x / weights.sum()
    hessians = real_models.collect_hessians(model, ids, sink_weight=16.0)
    torch.testing.assert_close(hessians[name], expected, rtol=1e-5, atol=1e-6)
    plain = real_models.collect_hessians(model, ids)  # weight 1: plain GPTQ's average
    torch.testing.assert_close(plain[name], 2 * x.t() @ x / x.shape[0], rtol=1e-5, atol=1e-6)


# 8-bit symmetric, every layer: PEQA re-quantizing the float base (4-bit asymmetric) gives other logits
ADOPT_FIXTURE = REPO / "tests" / "fixtures" / "compressed_tensors" / "aidreams260K-llama-hf-w8-sym-channel-rtn"


@pytest.mark.skipif(not (ADOPT_FIXTURE / "writer.json").exists(), reason="compressed-tensors fixture missing")
def test_adopt_rows_take_the_checkpoints_own_codes():
    """An ``--adopt DIR`` row is the checkpoint adopted by PEQA in its own codes (the writer's logits, the layers'
    own grid), with the writer and calibration named in the row's notes; not a re-quantization of its weights."""
    import json

    from safetensors.torch import load_file

    from peqa_peft.tuners.peqa import PeqaLayer

    model, info = real_models.adopted_checkpoint(ADOPT_FIXTURE)
    meta = json.loads((ADOPT_FIXTURE / "writer.json").read_text())
    ref = load_file(ADOPT_FIXTURE / "writer_logits.safetensors")
    layers = [m for m in model.modules() if isinstance(m, PeqaLayer)]
    assert layers and {m.get_base_layer().bits for m in layers} == {meta["bits"]}
    with torch.no_grad():
        torch.testing.assert_close(model(ref["input_ids"]).logits, ref["logits"], rtol=1e-5, atol=1e-5)
    assert info["source"] == ADOPT_FIXTURE.name and info["writer"].startswith("llm-compressor ")


def test_fractional_zero_rows_rebuild_a_q4_1_grid_exactly():
    """The ``fz`` rows' quantizer reproduces weights that lie on a Q4_1-style grid ``d * q + m`` (a float min, each
    group using codes 0 and 15): the measurement that SmolLM2's re-quantization cost is the integer zero-point."""
    torch.manual_seed(0)
    rows, groups, size = 6, 4, 32
    q = torch.randint(0, 16, (rows, groups, size)).float()
    q[..., 0], q[..., 1] = 0, 15  # every group spans the whole grid, as llama.cpp's Q4_1 quantizer makes it
    d = torch.rand(rows, groups, 1) * 0.01 + 1e-3
    m = -torch.rand(rows, groups, 1) * 0.05  # not a multiple of d: an integer zero-point cannot hold it
    w = (d * q + m).reshape(rows, groups * size)
    codes, scale, zero = real_models.fractional_zero_quantize(w, 4, size)
    assert torch.equal(codes.reshape(q.shape).float(), q)
    rebuilt = (scale.unsqueeze(-1) * (codes.reshape(q.shape).float() - zero.unsqueeze(-1))).reshape(w.shape)
    torch.testing.assert_close(rebuilt, w, rtol=0, atol=1e-6)
    assert not torch.equal(zero, zero.round())
