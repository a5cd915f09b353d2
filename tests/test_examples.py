"""The README's examples run end to end on a tiny budget and reload their adapters identically."""

import json
import subprocess
import sys

import pytest
from conftest import REPO


def run_example(script: str, tmp_path, *args: str) -> dict:
    """Run ``examples/<script>`` with ``args`` and return the JSON summary it prints last."""
    cmd = [sys.executable, str(REPO / "examples" / script), *args, "--output-dir", str(tmp_path / "out")]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_quickstart_runs_and_reloads(tmp_path):
    summary = run_example(
        "peqa_quickstart.py", tmp_path, "--steps", "3", "--batch-size", "2", "--seq-len", "64", "--eval-tokens", "1024"
    )
    assert summary["identical_reload"] is True
    assert all(summary[k] > 1 for k in ("ppl_fp32", "ppl_quantized", "ppl_peqa"))


@pytest.mark.slow
def test_sft_alpaca_peqa_example_runs(tmp_path):
    tiny = ["--demo", "--steps", "2", "--batch-size", "2", "--seq-len", "160", "--eval-tokens", "1024"]
    summary = run_example("sft_alpaca_peqa.py", tmp_path, *tiny, "--new-tokens", "4")["float"]
    assert summary["identical_reload"] is True and summary["tuned"] > 1
    # "auto" resolves to per channel on the demo model (32 does not divide its 688-wide down_proj)
    assert summary["group_size"] is None and isinstance(summary["sample"], str)


@pytest.mark.slow
def test_sft_alpaca_peqa_example_tunes_the_gguf_files_own_codes(tmp_path):
    """The main job's route: SmolLM2's Q4_1 codes adopted, scales tuned, the same GGUF written back."""
    from peqa_peft.workflows import model_zoo

    if not model_zoo.available("smollm2-135m"):
        pytest.skip(f"smollm2-135m is not installed ({model_zoo.INSTALL_HINT})")
    tiny = ["--steps", "1", "--batch-size", "2", "--seq-len", "64", "--eval-tokens", "512", "--new-tokens", "2"]
    summary = run_example("sft_alpaca_peqa.py", tmp_path, *tiny)
    run = summary["gguf"]
    assert "float" not in summary and run["identical_reload"] is True
    assert run["init"] > 1 and run["tuned"] > 1 and run["tuned"] != run["init"]
    import gguf

    reader = gguf.GGUFReader(run["export"])
    assert {t.tensor_type.name for t in reader.tensors} >= {"Q4_1"}


@pytest.mark.slow
def test_sft_alpaca_qft_example_runs(tmp_path):
    tiny = ["--steps", "2", "--train-rows", "16", "--eval-rows", "8", "--batch-size", "4"]
    summary = run_example("sft_alpaca_qft.py", tmp_path, *tiny)
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert summary["bytes_per_param"]["gradients"] < summary["bytes_per_param"]["weights"]
