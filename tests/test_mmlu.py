"""5-shot MMLU through lm-eval on a PEFT model object, from a local copy in the cais/mmlu layout."""

import json
import math

import pytest
from conftest import DEMO_LLAMA
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from peqa_peft import PeqaConfig
from peqa_peft.workflows.cli import main
from peqa_peft.workflows.evaluate import mmlu_accuracy

pytest.importorskip("lm_eval")

SUBJECT = "abstract_algebra"


def write_local_mmlu(root, n_test=4, n_dev=5):
    """A miniature MMLU repository: same layout and columns as cais/mmlu, arithmetic questions."""
    import datasets

    def rows(n, offset):
        out = []
        for i in range(n):
            a, b = i + offset, 2 * i + 1
            choices = [str(a + b), str(a + b + 1), str(a * b), str(a - b)]
            out.append({"question": f"What is {a} + {b}?", "subject": SUBJECT, "choices": choices, "answer": 0})
        return out

    for split, n, offset in (("test", n_test, 0), ("dev", n_dev, 100)):
        (root / SUBJECT).mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(rows(n, offset)).to_parquet(str(root / SUBJECT / f"{split}-00000-of-00001.parquet"))
    (root / "README.md").write_text(
        "---\nconfigs:\n"
        f"- config_name: {SUBJECT}\n  data_files:\n"
        f"  - split: test\n    path: {SUBJECT}/test-*.parquet\n"
        f"  - split: dev\n    path: {SUBJECT}/dev-*.parquet\n---\n"
    )
    return root


@pytest.mark.slow
def test_mmlu_on_peqa_model_from_local_copy(tmp_path):
    data = write_local_mmlu(tmp_path / "mmlu")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(DEMO_LLAMA), PeqaConfig(bits=4))
    tok = AutoTokenizer.from_pretrained(DEMO_LLAMA)
    result = mmlu_accuracy(model, tok, data_dir=str(data), tasks=(f"mmlu_{SUBJECT}",), batch_size=4)
    assert result["num_fewshot"] == 5
    assert 0.0 <= result["accuracy"] <= 1.0 and math.isfinite(result["accuracy"])
    again = mmlu_accuracy(model, tok, data_dir=str(data), tasks=(f"mmlu_{SUBJECT}",), batch_size=4)
    assert again["accuracy"] == result["accuracy"]


def test_mmlu_missing_local_copy_is_a_clear_error(tmp_path, capsys):
    code = main(["eval", "--model", str(DEMO_LLAMA), "--mmlu", "--mmlu-dir", str(tmp_path / "nowhere")])
    assert code == 2 and "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_cli_mmlu_json(tmp_path, capsys):
    data = write_local_mmlu(tmp_path / "mmlu")
    code = main(
        [
            "eval",
            "--model",
            str(DEMO_LLAMA),
            "--bits",
            "4",
            "--mmlu",
            "--mmlu-dir",
            str(data),
            "--mmlu-tasks",
            f"mmlu_{SUBJECT}",
            "--json",
            "--no-progress",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= result["mmlu"]["accuracy"] <= 1.0
