"""Issue 11: the command line range-checks every option and reports user errors in one line (exit status 2)."""

import json

import pytest
from conftest import DATA, DEMO_LLAMA

from peqa_peft.workflows.cli import main
from peqa_peft.workflows.train import resolve_checkpoint

TRAIN = ["train", "--model", str(DEMO_LLAMA), "--no-progress"]
EVAL = ["eval", "--model", str(DEMO_LLAMA), "--no-progress", "--dataset", "wikitext2"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (EVAL + ["--batch-size", "-1"], "--batch-size: must be a positive integer, got -1"),
        (EVAL + ["--max-tokens", "-5"], "--max-tokens: must be a positive integer, got -5"),
        (EVAL + ["--bits", "0"], "--bits: must be one of"),
        (EVAL + ["--seq-len", "1"], "--seq-len: must be at least 2 tokens"),
        (TRAIN + ["--output-dir", "o", "--max-steps", "-5"], "--max-steps: must be a positive number of steps"),
        (TRAIN + ["--output-dir", "o", "--max-steps", "0"], "--max-steps: must be a positive number of steps"),
        (TRAIN + ["--output-dir", "o", "--lr", "nan"], "--lr: must be a positive finite number"),
        (TRAIN + ["--output-dir", "o", "--epochs", "0"], "--epochs: must be a positive finite number"),
        (TRAIN + ["--output-dir", "o", "--bits", "9"], "--bits: must be one of"),
        (TRAIN + ["--output-dir", "o", "--group-size", "-3"], "--group-size: must be 'auto', a positive group size"),
        (TRAIN + ["--output-dir", "o", "--save-steps", "-1"], "--save-steps: must be 0 or a positive integer"),
    ],
)
def test_numeric_options_are_range_checked_at_parse_time(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def run_cli(argv, capsys) -> str:
    """The one-line error of a refused command (exit status 2, no traceback)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]  # progress bars may precede it
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize("method", ["qft", "lora"])
def test_bits_is_refused_where_it_does_not_apply(tmp_path, method, capsys):
    err = run_cli(TRAIN + ["--output-dir", str(tmp_path / "o"), "--method", method, "--bits", "3"], capsys)
    assert f"do not apply to --method {method}" in err


def test_output_dir_that_is_a_file_is_refused_before_loading(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("x")
    assert "exists and is not a directory" in run_cli(TRAIN + ["--output-dir", str(target)], capsys)
    err = run_cli(TRAIN + ["--output-dir", str(target / "sub")], capsys)
    assert f"'{target}' is a file" in err


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty"),
        ('[{"instruction": "a", "output": ', "could not be read as json"),
        ("[]", "corresponds to no data"),
        (json.dumps([{"instruction": "a", "input": "", "output": None}]), "record 0: 'output' is None, not text"),
    ],
    ids=["empty-file", "broken-json", "no-records", "null-output"],
)
def test_bad_dataset_files_are_named_in_one_line(tmp_path, content, message, capsys):
    data = tmp_path / "data.json"
    data.write_text(content)
    err = run_cli(TRAIN + ["--output-dir", str(tmp_path / "o"), "--dataset", str(data)], capsys)
    assert message in err and str(data) in err
    assert not (tmp_path / "o").exists()


def test_binary_eval_file_is_named(tmp_path, capsys):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)))
    argv = ["eval", "--model", str(DEMO_LLAMA), "--text-file", str(binary)]
    assert f"text file {binary} is not UTF-8 text" in run_cli(argv, capsys)


def test_debug_shows_the_traceback(tmp_path):
    target = tmp_path / "taken"
    target.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        main(["--debug", *TRAIN, "--output-dir", str(target)])


def make_checkpoint(root, step, complete):
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"")
    if complete:
        (path / "trainer_state.json").write_text("{}")
    return path


def test_resume_last_skips_an_interrupted_checkpoint(tmp_path, capsys):
    make_checkpoint(tmp_path, 2, complete=True)
    good = make_checkpoint(tmp_path, 4, complete=True)
    make_checkpoint(tmp_path, 10, complete=False)  # killed while saving: newest, but no trainer_state.json
    assert resolve_checkpoint("last", str(tmp_path)) == str(good)
    assert "skipping incomplete checkpoint" in capsys.readouterr().err
    with pytest.raises(ValueError, match="is incomplete"):
        resolve_checkpoint(str(tmp_path / "checkpoint-10"), str(tmp_path))
    with pytest.raises(ValueError, match="no complete checkpoint"):
        resolve_checkpoint("last", str(tmp_path / "elsewhere"))


@pytest.mark.slow
def test_resume_with_other_bits_is_refused(tmp_path, capsys):
    """A 3-bit run resumed from a 4-bit checkpoint used to exit 0 with an adapter labelled bits=3."""
    common = ["--dataset", str(DATA / "alpaca_en_demo.json"), "--max-samples", "8", "--batch-size", "2"]
    common += ["--seq-len", "160", "--output-dir", str(tmp_path / "run"), "--save-steps", "1"]
    assert main(TRAIN + common + ["--max-steps", "1", "--bits", "4"]) == 0
    capsys.readouterr()
    err = run_cli(TRAIN + common + ["--max-steps", "2", "--bits", "3", "--resume-from-checkpoint", "last"], capsys)
    assert "different quantized base" in err or "inconsistent" in err
