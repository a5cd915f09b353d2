"""Perplexity against a hand-computed reference, and the evaluation-text loaders."""

import math

import pytest
import torch

from peqa_peft.workflows.evaluate import load_eval_text, perplexity


class Bigram(torch.nn.Module):
    """A fixed bigram 'language model' whose log-probabilities are easy to compute by hand."""

    def __init__(self, vocab=5):
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab))
        self.config = type("Cfg", (), {"max_position_embeddings": 16})()

    def forward(self, input_ids):
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_perplexity_matches_hand_computation():
    model = Bigram()
    ids = torch.tensor([0, 1, 2, 3, 4, 0, 2, 1, 3])  # 9 tokens, seq_len 4 -> 2 windows, tail of 1 dropped
    result = perplexity(model, input_ids=ids, seq_len=4, batch_size=1, progress=False)
    logp = torch.log_softmax(model.table.detach(), -1)
    nll = 0.0
    for window in ([0, 1, 2, 3], [4, 0, 2, 1]):
        for a, b in zip(window[:-1], window[1:]):
            nll -= logp[a, b].item()
    assert result.tokens == 6 and result.windows == 2
    assert math.isclose(result.perplexity, math.exp(nll / 6), rel_tol=1e-6)
    again = perplexity(model, input_ids=ids, seq_len=4, batch_size=2, progress=False)
    assert math.isclose(again.perplexity, result.perplexity, rel_tol=1e-6)


def test_perplexity_bad_input():
    model = Bigram()
    with pytest.raises(ValueError, match="context length"):
        perplexity(model, input_ids=torch.arange(40) % 5, seq_len=32, progress=False)
    with pytest.raises(ValueError, match="at least"):
        perplexity(model, input_ids=torch.arange(3), seq_len=4, progress=False)
    with pytest.raises(ValueError, match="input_ids"):
        perplexity(model, progress=False)


def test_bundled_eval_texts():
    wiki = load_eval_text("wikitext2")
    assert "\r" not in wiki and wiki.startswith("\n\n = Robert Boulter = \n")  # first row is empty
    ptb = load_eval_text("ptb")
    assert "\n" not in ptb and len(ptb.split()) > 75_000
    with pytest.raises(ValueError, match="unknown evaluation set"):
        load_eval_text("c4")
