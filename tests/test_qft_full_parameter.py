"""Full-parameter QFT (the default): embeddings and output head as integer weights, norms and biases in float."""

import pytest
import torch
from conftest import tiny_llama
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from peqa_peft import IntLion, QftConfig
from peqa_peft.core.qft.grad import quantize_grad_rows
from peqa_peft.tuners.qft import Int8Grad, QftLayer, QftWeight, qft_embedding


def _table(rows: int = 40, dim: int = 24, outliers: float = 0.02, int8_grad: bool = True) -> QftWeight:
    torch.manual_seed(0)
    return QftWeight.from_float(torch.randn(rows, dim), outlier_fraction=outliers, int8_grad=int8_grad)


@pytest.mark.parametrize("synced", [False, True], ids=["touched-rows", "ddp-chunks"])
@pytest.mark.parametrize("padding_idx", [None, 3])
def test_embedding_lookup_and_gradient_match_the_dense_reference(padding_idx, synced, monkeypatch):
    monkeypatch.setattr("peqa_peft.core.qft.embedding.row_chunks", lambda rows, cols: [(0, 7), (7, 30), (30, rows)])
    weight = nn.Parameter(_table(int8_grad=False), requires_grad=True)
    weight.sync_grads = "fp32" if synced else False  # the DDP path (one process here: the average is the chunk)
    ids = torch.tensor([[1, 3, 3, 39], [0, 7, 7, 30]])
    dense = weight.dequantize().clone().requires_grad_(True)
    ref = nn.functional.embedding(ids, dense, padding_idx=padding_idx)
    out = qft_embedding(ids, weight, padding_idx)
    assert torch.equal(out, ref)  # only looked-up rows dequantized, outliers included
    upstream = torch.randn_like(ref)
    ref.backward(upstream)
    out.backward(upstream)
    assert torch.allclose(weight.grad, dense.grad, atol=1e-6)
    if padding_idx is not None:
        assert not weight.grad[padding_idx].any()


@pytest.mark.parametrize("synced", [False, True], ids=["touched-rows", "ddp-chunks"])
def test_embedding_int8_gradient_is_the_quantized_reference(synced):
    weight = nn.Parameter(_table(int8_grad=True), requires_grad=True)
    weight.sync_grads = "fp32" if synced else False
    ids = torch.tensor([5, 5, 9, 0, 39])
    dense = weight.dequantize().clone().requires_grad_(True)
    upstream = torch.randn(5, 24)
    nn.functional.embedding(ids, dense).backward(upstream)
    qft_embedding(ids, weight).backward(upstream)
    assert isinstance(weight.grad, Int8Grad)
    codes, scale = quantize_grad_rows(dense.grad)
    assert torch.equal(weight.grad.codes, codes) and torch.equal(weight.grad.scale, scale)


def test_embedding_refuses_bad_ids_and_unsupported_options():
    weight = _table()
    with pytest.raises(IndexError, match="out of range"):
        qft_embedding(torch.tensor([40]), weight)
    model = tiny_llama()
    model.model.embed_tokens.max_norm = 1.0
    with pytest.raises(ValueError, match="max_norm"):
        get_peft_model(model, QftConfig(task_type="CAUSAL_LM"))
    assert type(model.model.embed_tokens) is nn.Embedding  # refused before anything was replaced


def _train(model, steps: int = 2) -> None:
    optimizer = IntLion.from_model(model, lr=1e-2)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_full_parameter_trains_embeddings_head_and_norms_and_round_trips(tmp_path):
    model = get_peft_model(tiny_llama(), QftConfig(task_type="CAUSAL_LM"))
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embed, QftLayer) and isinstance(head, QftLayer)
    before = {
        n: (p.codes.clone() if isinstance(p, QftWeight) else p.detach().clone()) for n, p in model.named_parameters()
    }
    _train(model)
    for name, p in model.named_parameters():
        now = p.codes if isinstance(p, QftWeight) else p.detach()
        assert not torch.equal(now, before[name]), f"{name} did not train"
    ids = torch.randint(0, 128, (2, 10))
    model.eval()
    logits = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any(k.endswith("norm.weight") for k in saved)  # the float parameters travel with the adapter
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(reloaded(input_ids=ids).logits, logits)


def test_linear_only_saves_no_float_parameters(tmp_path):
    model = get_peft_model(tiny_llama(), QftConfig(task_type="CAUSAL_LM", full_parameter=False))
    model.save_pretrained(tmp_path)
    assert all(".qft_weight." in k for k in load_file(tmp_path / "adapter_model.safetensors"))


def test_tied_embeddings_share_one_integer_weight(tmp_path):
    model = get_peft_model(tiny_llama(tie_word_embeddings=True), QftConfig(task_type="CAUSAL_LM"))
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert embed.qft_weight["default"] is head.qft_weight["default"]  # one weight, as in the base model
    _train(model)  # the gradients of both uses are summed (Int8Grad + Int8Grad)
    ids = torch.randint(0, 128, (2, 10))
    model.eval()
    logits = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=True), tmp_path)
    assert (
        reloaded.get_input_embeddings().qft_weight["default"] is reloaded.get_output_embeddings().qft_weight["default"]
    )
    assert torch.equal(reloaded(input_ids=ids).logits, logits)


def test_a_bad_saved_norm_is_refused_before_loading(tmp_path):
    model = get_peft_model(tiny_llama(), QftConfig(task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    weights = load_file(path)
    key = next(k for k in weights if k.endswith("model.norm.weight"))
    weights[key] = torch.full_like(weights[key], float("nan"))
    save_file(weights, path)
    fresh = tiny_llama()
    with pytest.raises(ValueError, match="non-finite"):
        PeftModel.from_pretrained(fresh, tmp_path)
    assert type(fresh.model.embed_tokens) is nn.Embedding


@pytest.mark.parametrize("exclude", [["lm_head"], ["embed_tokens"], ["lm_head", "embed_tokens"]])
def test_tied_pair_is_never_split_between_integer_and_float(exclude):
    """Excluding either half leaves the whole tied pair float (trained as a float parameter), never half of it."""
    config = QftConfig(task_type="CAUSAL_LM", exclude_modules=exclude)
    model = get_peft_model(tiny_llama(tie_word_embeddings=True), config)
    base = model.get_base_model()
    assert type(base.model.embed_tokens) is nn.Embedding and type(base.lm_head) is nn.Linear
    assert base.lm_head.weight is base.model.embed_tokens.weight and base.lm_head.weight.requires_grad
    assert model.peft_config["default"].tied_embeddings == "float"


def test_a_saved_config_from_before_full_parameter_loads_linear_only(tmp_path):
    import json

    model = get_peft_model(tiny_llama(), QftConfig(task_type="CAUSAL_LM", full_parameter=False))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    del config["full_parameter"]  # as written by peqa_peft before the option existed
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert not reloaded.peft_config["default"].full_parameter
    assert not isinstance(reloaded.get_input_embeddings(), QftLayer)
    assert QftConfig.from_pretrained(tmp_path).full_parameter is False
