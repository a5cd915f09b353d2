"""The benchmark harness (benchmarks/run.py) runs end to end on a tiny model and writes its tables and plots.

No timing assertions: the figures themselves are noisy on shared machines; this keeps the harness working.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
# A few configurations covering each code path (LoRA reference, PEQA grouped, full FT) keep
# the test under a minute; every configuration runs in the slow full `--tiny` run.
CONFIGS = "lora_fp,peqa4_g,full_adamw"


@pytest.fixture(scope="module")
def bench_modules():
    sys.path.insert(0, str(BENCH))
    import bench_measure
    import run

    yield run, bench_measure
    sys.path.remove(str(BENCH))


def test_tiny_run_writes_tables_and_plots(tmp_path, bench_modules):
    run, _ = bench_modules
    results = run.orchestrate(
        run.parse_args(["--tiny", "--in-process", "--configs", CONFIGS, "--output-dir", str(tmp_path)])
    )
    by_name = {r["name"]: r for r in results}
    assert set(by_name) == set(CONFIGS.split(","))
    for name in ("lora_fp", "peqa4_g", "full_adamw"):
        assert "skipped" not in by_name[name], by_name[name]
    for file in ("results.md", "README_table.md", "results.json", "memory_state.png", "step_time_ratio.png",
                 "ppl_vs_bytes.png"):  # fmt: skip
        assert (tmp_path / file).stat().st_size > 0, file
    table = (tmp_path / "README_table.md").read_text()
    assert "PEQA 4-bit grouped" in table and "Full FT, fp32 AdamW" in table and "command:" in table
    # fp32 AdamW full fine-tuning holds exactly 4 + 4 + 8 bytes per parameter, counted from the live tensors.
    full = by_name["full_adamw"]["state_bytes_per_param"]
    assert (full["weights"], full["gradients"], full["optimizer"]) == pytest.approx((4.0, 4.0, 8.0), rel=1e-3)
    peqa = by_name["peqa4_g"]
    assert peqa["state_bytes_per_param"]["weights"] < full["weights"] and peqa["saved_bytes"] > 0
    assert peqa["set_adapter_ms"] >= 0 and peqa["adapter_load_ms"] > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["meta"]["settings"]["steps"] == 2


def test_skipped_configuration_reports_reason(tmp_path, bench_modules):
    run, _ = bench_modules
    from bench_configs import Context, Spec, build_reference

    spec = Spec("needs_missing", "needs a missing package", "full", build_reference, requires=("no_such_module_xyz",))
    reason = spec.skip_reason(Context("unused", None, None, {}))
    assert reason and "no_such_module_xyz" in reason


def test_qft_rows_count_integer_storage(tmp_path, bench_modules):
    run, _ = bench_modules
    pytest.importorskip("peqa_peft.tuners.qft")
    (result,) = run.orchestrate(
        run.parse_args(["--tiny", "--in-process", "--configs", "qft_fused", "--output-dir", str(tmp_path)])
    )
    assert "skipped" not in result, result
    bpp = result["state_bytes_per_param"]
    # Every parameter trained: int8 codes + fp outliers (norms in fp32) are far below fp32's 4 bytes, and fused mode
    # keeps no gradients.
    assert bpp["weights"] < 1.5 and bpp["gradients"] == 0 and bpp["optimizer"] > 0


def test_qft_quality_runs_merge_into_one_report_and_refuse_other_settings(tmp_path, bench_modules):
    import qft_quality

    def record(name, *argv):
        qft_quality.main(["--steps", "2", "--eval-tokens", "512", "--output-dir", str(tmp_path / name), *argv])
        return str(tmp_path / name)

    adamw = record("adamw", "--configs", "adamw", "--lrs", "1e-3", "--adamw-betas", "0.7", "0.999")
    qft = record("qft", "--configs", "qft", "--lrs", "3e-4", "--betas", "0.7", "0.9")
    qft_quality.main(["--merge", adamw, qft, "--output-dir", str(tmp_path / "merged")])
    text = (tmp_path / "merged" / "results.md").read_text()
    assert "| adamw **best** | 0.001 | (0.7, 0.999) |" in text and "| qft **best** | 0.0003 | (0.7, 0.9) |" in text
    assert "--adamw-betas 0.7 0.999" in text and "Best QFT + IntLion: lr 0.0003, betas (0.7, 0.9)" in text
    assert "Report: `python benchmarks/qft_quality.py --merge" in text
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert [r["config"] for r in merged["rows"]] == ["adamw", "qft"]
    other = record("other", "--configs", "adamw", "--lrs", "1e-3", "--seed", "1")
    with pytest.raises(ValueError, match="settings"):
        qft_quality.merge([adamw, other])
    with pytest.raises(SystemExit):  # --recommended fixes the betas: passing others is refused, not ignored
        qft_quality.parse_args(["--recommended", "--betas", "0.9", "0.99"])
