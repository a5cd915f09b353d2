"""Shared fixtures. Tests never reach the network: the Hub is switched off before anything imports it."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO_LLAMA = REPO / "assets" / "demo-llama"
DATA = REPO / "assets" / "data"


@pytest.fixture(scope="session")
def demo_path() -> Path:
    return DEMO_LLAMA


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture
def demo_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(DEMO_LLAMA)


@pytest.fixture(scope="session")
def demo_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO_LLAMA)


def tiny_llama(seed: int = 0, **overrides):
    """A randomly initialised 2-layer Llama built from a config (for structural tests only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    kwargs.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**kwargs)).eval()


def tiny_gpt2(seed: int = 0):
    """A randomly initialised 2-layer GPT-2 (its linears are transformers ``Conv1D``)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()
