"""Saving, loading (in a fresh process), fingerprints, registration with PEFT and Hub uploads."""

import json
import subprocess
import sys
import textwrap
from unittest import mock

import pytest
import torch
from conftest import REPO, tiny_llama
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model
from peft.utils import PeftType
from safetensors.torch import load_file

import peqa_peft
from peqa_peft import PeqaConfig


def trained_adapter(base, **config):
    model = get_peft_model(base, PeqaConfig(bits=4, init_weights=False, task_type="CAUSAL_LM", **config))
    return model


def test_registration_is_idempotent_and_complete():
    import importlib

    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    importlib.reload(peqa_peft.integrations.peft.registration)
    peqa_peft.integrations.peft.registration.register_method("peqa", PeqaConfig, peqa_peft.PeqaModel)
    peqa_peft.integrations.peft.registration.patch_peft_model()
    assert PeftType("PEQA") is PeftType.PEQA and PeftType.PEQA == "PEQA"
    assert list(PeftType).count(PeftType.PEQA) == 1
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.PEQA] is PeqaConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.PEQA] is peqa_peft.PeqaModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.PEQA] == "peqa_"
    assert PeftType.LORA in PEFT_TYPE_TO_TUNER_MAPPING  # other methods unaffected
    assert peqa_peft.integrations.peft.registration.TESTED_PEFT_VERSIONS[0] == ".".join(
        __import__("peft").__version__.split(".")[:2]
    ), "PEFT was upgraded: re-check peft_integration.py against its internals and update the pin"


def test_save_writes_only_scale_deltas_and_fingerprint(tmp_path):
    # per output channel (explicitly: the default "auto" picks group 32 for this model's widths, tested below)
    model = trained_adapter(tiny_llama(), group_size=None)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert len(tensors) == 14 and all(k.endswith(".peqa_scale") for k in tensors)
    assert sum(t.numel() for t in tensors.values()) == model.get_nb_trainable_parameters()[0]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PEQA" and config["bits"] == 4 and config["group_size"] is None
    fingerprint = config["base_fingerprint"]
    assert fingerprint["bits"] == 4 and len(fingerprint["layers"]) == 14
    card = (tmp_path / "README.md").read_text()
    assert "method: PEQA" in card and "bits: 4" in card and "group_size: none (per output channel)" in card


def test_auto_group_size_is_saved_as_its_resolved_value(tmp_path):
    """group_size="auto" (the default) resolves to 32 on a model whose widths 32 divides; the saved adapter and its
    fingerprint record 32, so it reloads onto the identical grid."""
    model = trained_adapter(tiny_llama())
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["group_size"] == 32 and config["base_fingerprint"]["group_size"] == 32


def test_reload_in_same_process_identical_logits(tmp_path):
    ids = torch.randint(0, 128, (2, 12))
    model = trained_adapter(tiny_llama(), group_size=16, train_zero_point=True)
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    assert PeftConfig.from_pretrained(tmp_path).peft_type == PeftType.PEQA


@pytest.mark.slow
def test_reload_in_fresh_process_identical_logits(tmp_path, demo_model, demo_path):
    """Train a little, save, then load with AutoPeftModelForCausalLM in a new interpreter: identical logits."""
    model = get_peft_model(demo_model, PeqaConfig(bits=3, task_type="CAUSAL_LM"))
    ids = torch.randint(0, 4096, (1, 32), generator=torch.Generator().manual_seed(0))
    optim = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(ids, labels=ids).loss.backward()
    optim.step()
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "adapter")
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import os, torch
        os.environ["HF_HUB_OFFLINE"] = "1"
        import peqa_peft
        from peft import AutoPeftModelForCausalLM
        model = AutoPeftModelForCausalLM.from_pretrained({str(tmp_path / "adapter")!r})
        ref = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            logits = model(ref["ids"]).logits
        assert torch.equal(logits, ref["logits"]), (logits - ref["logits"]).abs().max()
        print("IDENTICAL")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert "IDENTICAL" in result.stdout, result.stderr[-3000:]


def test_loading_onto_a_different_base_fails_clearly(tmp_path):
    trained_adapter(tiny_llama(seed=0)).save_pretrained(tmp_path)
    other = tiny_llama(seed=1)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="different quantized base"):
        PeftModel.from_pretrained(other, tmp_path)
    # the check runs before any module is replaced
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())


def test_loading_onto_a_merged_base_fails_clearly(tmp_path):
    model = trained_adapter(tiny_llama())
    model.save_pretrained(tmp_path)
    merged = model.merge_and_unload()
    with pytest.raises(ValueError, match="different quantized base"):
        PeftModel.from_pretrained(merged, tmp_path)


def test_loading_onto_a_base_without_the_targets_fails_clearly(tmp_path):
    trained_adapter(tiny_llama()).save_pretrained(tmp_path)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=1, n_head=4))
    with pytest.raises(ValueError, match="not found in the base model|did not match|which this model does not have"):
        PeftModel.from_pretrained(gpt2, tmp_path)


def test_fingerprint_check_can_be_skipped_explicitly(tmp_path):
    trained_adapter(tiny_llama(seed=0)).save_pretrained(tmp_path)
    config = PeftConfig.from_pretrained(tmp_path)
    config.base_fingerprint = None
    PeftModel.from_pretrained(tiny_llama(seed=1), tmp_path, config=config)


def test_load_second_adapter_and_switch(tmp_path):
    ids = torch.randint(0, 128, (1, 8))
    one = trained_adapter(tiny_llama())
    one.save_pretrained(tmp_path / "one")
    two = trained_adapter(tiny_llama())
    two.save_pretrained(tmp_path / "two")
    with torch.no_grad():
        expected_one, expected_two = one(ids).logits, two(ids).logits
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "one", adapter_name="one")
    model.load_adapter(tmp_path / "two", adapter_name="two")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected_one)
        model.set_adapter("two")
        assert torch.equal(model(ids).logits, expected_two)


def test_auto_peft_model_and_config_from_local_dir(tmp_path, demo_model, demo_path):
    model = get_peft_model(demo_model, PeqaConfig(bits=4, task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path)
    assert PeftConfig.from_pretrained(tmp_path).base_model_name_or_path == str(demo_path)
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.peft_config["default"].peft_type == PeftType.PEQA


def test_push_to_hub_uploads_adapter_and_card(tmp_path):
    """push_to_hub against a stand-in HfApi: exactly the adapter files plus a card naming method/bits/base."""
    model = trained_adapter(tiny_llama(), group_size=32)
    uploaded = {}

    def upload_folder(repo_id, folder_path, **kwargs):
        from pathlib import Path

        uploaded.update({p.name: p.read_bytes() for p in Path(folder_path).iterdir()})
        uploaded["__repo__"] = repo_id
        return "commit-url"

    fake_api = mock.MagicMock()
    fake_api.create_repo.return_value.repo_id = "user/peqa-adapter"
    fake_api.upload_folder.side_effect = upload_folder
    with mock.patch("peqa_peft.integrations.hub.HfApi", return_value=fake_api):
        assert model.push_to_hub("user/peqa-adapter", private=True, commit_description="d") == "commit-url"
    fake_api.create_repo.assert_called_once()
    assert uploaded.pop("__repo__") == "user/peqa-adapter"
    assert sorted(uploaded) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    card = uploaded["README.md"].decode()
    assert "method: PEQA" in card and "bits: 4" in card and "group_size: 32" in card and "base model" in card
    assert json.loads(uploaded["adapter_config.json"])["peft_type"] == "PEQA"
