"""The README's main job (examples/peqa_quickstart.py) runs end to end on a tiny budget."""

import json
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_quickstart_runs_and_reloads(tmp_path):
    cmd = [
        sys.executable,
        str(REPO / "examples" / "peqa_quickstart.py"),
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--seq-len",
        "64",
        "--eval-tokens",
        "1024",
        "--output-dir",
        str(tmp_path / "out"),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["identical_reload"] is True
    assert all(summary[k] > 1 for k in ("ppl_fp32", "ppl_quantized", "ppl_peqa"))
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_sft_alpaca_peqa_example_runs(tmp_path):
    cmd = [
        sys.executable,
        str(REPO / "examples" / "sft_alpaca_peqa.py"),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "160",
        "--eval-tokens",
        "1024",
        "--output-dir",
        str(tmp_path / "out"),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["identical_reload"] is True and summary["ppl_peqa"] > 1
