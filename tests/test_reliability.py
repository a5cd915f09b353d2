"""No silent garbage from what peqa_peft adopts or writes (issue 21).

Adopted quantized checkpoints get the checks saved adapters get (one module, ``peqa_peft.integrations.validation``),
before any layer is replaced; merged saves and exports replace their target directory atomically and leave nothing
stale; output paths are checked before any model is loaded.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEMO_LLAMA, REPO, tiny_llama
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import peqa_peft  # noqa: F401
from peqa_peft import PeqaConfig

FIXTURE = REPO / "tests" / "fixtures" / "compressed_tensors" / "aidreams260K-llama-hf-w4-asym-channel-rtn"
K_PROJ = "model.layers.0.self_attn.k_proj"
PY = sys.executable


@pytest.fixture
def ckpt(tmp_path):
    """A copy of the asymmetric 4-bit per-channel llm-compressor checkpoint, to edit."""
    out = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, out)
    return out


def edit_checkpoint(path: Path, edit) -> None:
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_adoption_refused(path: Path, message: str) -> None:
    """get_peft_model raises ``message`` (a ValueError) and leaves the loaded model exactly as it was."""
    model = AutoModelForCausalLM.from_pretrained(path)
    modules = {n: type(m) for n, m in model.named_modules()}
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        get_peft_model(model, PeqaConfig(bits=4, task_type="CAUSAL_LM"))
    assert {n: type(m) for n, m in model.named_modules()} == modules, "modules were replaced"
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:  # bitwise, NaN included (the NaN probe's scale must still be there, untouched)
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, equal_nan=True)


def _set(name, fn):
    def edit(t):
        t[name] = fn(t[name])

    return edit


def _nan_row(scale):
    scale = scale.clone()
    scale[5] = float("nan")
    return scale


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            _set(f"{K_PROJ}.weight_scale", _nan_row),
            r"layer 'model\.layers\.0\.self_attn\.k_proj'.*'weight_scale' contains 1 NaN or inf.*first at row 5",
        ),
        (_set(f"{K_PROJ}.weight_scale", torch.zeros_like), r"k_proj'.*'weight_scale' must be positive, but 64 of 64"),
        (_set(f"{K_PROJ}.weight_scale", torch.neg), r"k_proj'.*'weight_scale' must be positive"),
        # gate_proj has 172 outputs: 172 * 4 bits leave 16 padding bits in the last zero-point word, which -1 sets
        (
            lambda t: [
                t.__setitem__(k, torch.full_like(v, -1)) for k, v in list(t.items()) if k.endswith("zero_point")
            ],
            r"mlp\.gate_proj'.*'weight_zero_point' has non-zero padding bits",
        ),
    ],
    ids=["nan-scale-row", "zero-scales", "negated-scales", "zero-point-words-minus-1"],
)
def test_corrupt_adopted_tensors_are_refused_naming_file_and_layer(ckpt, edit, message):
    edit_checkpoint(ckpt, edit)
    assert_adoption_refused(ckpt, f"model.safetensors: .*{message}")


def test_symmetric_config_with_stored_zero_points_is_refused(ckpt):
    """transformers drops the zero-points as UNEXPECTED; adoption names the layer and the contradiction."""
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = True
    (ckpt / "config.json").write_text(json.dumps(config))
    assert_adoption_refused(
        ckpt, r"layer 'model\.layers\.0\.self_attn\.q_proj'.*says 'symmetric: true'.*stores 'weight_zero_point'"
    )


def test_asymmetric_config_without_zero_points_is_refused(ckpt):
    edit_checkpoint(ckpt, lambda t: [t.pop(k) for k in list(t) if k.endswith("weight_zero_point")])
    assert_adoption_refused(ckpt, r"q_proj'.*says 'symmetric: false'.*needs 'weight_zero_point'.*no such tensor")


def test_unedited_checkpoint_still_adopts(ckpt):
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    get_peft_model(model, PeqaConfig(bits=4, task_type="CAUSAL_LM"))


@pytest.mark.parametrize("bad", [float("nan"), 0.0, -0.02])
def test_gptq_scales_are_checked_like_adapters(bad):
    from test_adopt_checkpoints import FakeGptqLinear
    from torch import nn

    scales = torch.full((2, 32), 0.02)
    scales[1, 3] = bad
    codes = torch.randint(0, 16, (32, 64), generator=torch.Generator().manual_seed(0))
    model = nn.Sequential(FakeGptqLinear(codes, scales, torch.full((2, 32), 8), 4, torch.arange(64) // 32))
    with pytest.raises(ValueError, match=r"layer '0': 'scales' (contains 1 NaN|must be positive, but 1 of 64)"):
        get_peft_model(model, PeqaConfig(bits=4, group_size=32, target_modules=["0"]))
    assert isinstance(model[0], FakeGptqLinear)


def test_shared_checks():
    """The functions the GGUF reader calls: sign checking is a parameter (K-quant sub-block minima are negative)."""
    from peqa_peft.integrations import validation

    scale = torch.tensor([[0.5], [-0.25], [0.0]])
    validation.check_scales(scale, "f.gguf: tensor 'blk.0'", sign="any")
    with pytest.raises(ValueError, match=r"^f\.gguf: tensor 'blk\.0': 'scale' must be positive, but 2 of 3"):
        validation.check_scales(scale, "f.gguf: tensor 'blk.0'")
    with pytest.raises(ValueError, match="NaN"):
        validation.check_scales(torch.tensor([float("inf")]), "w", sign="any")
    validation.check_grid(torch.tensor([-8, 7]), 4, "w", "zp", signed=True)
    with pytest.raises(ValueError, match=r"'zp' has 1 values outside \[0, 15\]"):
        validation.check_grid(torch.tensor([0, 16]), 4, "w", "zp")
    with pytest.raises(ValueError, match="fractional"):
        validation.check_grid(torch.tensor([0.5]), 4, "w", "zp")
    validation.check_padding_bits(torch.tensor([[0x0FFF_FFFF]], dtype=torch.int32), 28, "w", "p")
    with pytest.raises(ValueError, match="padding"):
        validation.check_padding_bits(torch.tensor([[-1]], dtype=torch.int32), 28, "w", "p")


# ------------------------------------------------------------------------------------------ merged saves, exports


def tuned_tiny():
    from test_export import tuned

    return tuned(tiny_llama(vocab_size=256))


def merged_and_logits():
    model = tuned_tiny()
    with torch.no_grad():
        expected = model(torch.tensor([IDS])).logits
    return model, model.merge_and_unload(), expected


IDS = [1, 5, 9, 17, 33, 65]


def fresh_logits(directories: list[Path], cwd: Path) -> dict:
    """Logits of each directory loaded by plain transformers in a process that never imports peqa_peft."""
    from test_export import run_fresh

    return run_fresh(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        out = {{}}
        for d in {[str(d) for d in directories]!r}:
            with torch.no_grad():
                out[d] = AutoModelForCausalLM.from_pretrained(d)(torch.tensor([{IDS!r}])).logits.tolist()
        print(json.dumps(out))
        """,
        cwd,
    )


def test_merged_save_into_an_adapter_or_sharded_directory_leaves_nothing_stale(tmp_path):
    """Into a copy of the adapter directory: refused up front (the adapter files are not ours), then with
    overwrite=True exactly the merged checkpoint. Into an earlier sharded save: the shards and index are superseded.
    Both load in a fresh process without peqa_peft and give the tuned logits."""
    peft_model, merged, expected = merged_and_logits()
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    with pytest.raises(ValueError, match=r"'.*adapter' holds files that are not part of a model save "):
        merged.save_pretrained(adapter)
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before  # refused before anything was written
    merged.save_pretrained(adapter, overwrite=True)
    assert sorted(p.name for p in adapter.iterdir()) == [
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]

    sharded = tmp_path / "sharded"
    tiny_llama(vocab_size=256).save_pretrained(sharded, max_shard_size="100KB")
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    (sharded / "README.md").write_text("my notes\n")
    merged.save_pretrained(sharded)
    names = sorted(p.name for p in sharded.iterdir())
    assert names == ["README.md", "config.json", "generation_config.json", "model.safetensors"], names
    assert "my notes\n\n## Quantized with PEQA" in (sharded / "README.md").read_text()  # card kept, section added
    assert not list(tmp_path.glob(".*"))  # no temporary directory left beside the targets

    got = fresh_logits([adapter, sharded], tmp_path)
    for d in (adapter, sharded):
        torch.testing.assert_close(torch.tensor(got[str(d)]), expected, rtol=1e-4, atol=1e-4)


def test_merged_save_keeps_the_tokenizer_and_replaces_an_earlier_merged_save(tmp_path, demo_tokenizer):
    _, merged, _ = merged_and_logits()
    out = tmp_path / "m"
    merged.save_pretrained(out)
    demo_tokenizer.save_pretrained(out)
    (out / ".peqa-save-abc123").mkdir()  # what an earlier version's killed save left inside its target
    first = (out / "model.safetensors").stat().st_mtime_ns
    merged.save_pretrained(out)
    assert (out / "tokenizer.json").exists() and not (out / ".peqa-save-abc123").exists()
    assert (out / "model.safetensors").stat().st_mtime_ns != first


KILLED = """
import os, signal, sys
from peqa_peft.export._common import atomic_output_dir
with atomic_output_dir(sys.argv[1], overwrite=True) as tmp:
    (tmp / "half").write_text("written")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_temporary_directories_of_killed_runs_are_removed_by_the_next_run(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "previous").write_text("kept until replaced")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([PY, "-c", KILLED, str(out)], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    leftovers = list(tmp_path.glob(".export.tmp-*"))
    assert len(leftovers) == 1 and (leftovers[0] / "half").exists()  # the kill really left one behind
    (tmp_path / ".export.tmp-abcd1234").mkdir()  # an earlier version's name (no process id): always stale
    assert (out / "previous").exists()  # the earlier output is intact
    export_dir = tmp_path / "export"
    from peqa_peft.export import export

    export(tuned_tiny(), export_dir, tokenizer=str(DEMO_LLAMA), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert (export_dir / "model.safetensors").exists() and not (export_dir / "previous").exists()


def test_a_run_killed_between_the_two_renames_gets_its_previous_output_back(tmp_path):
    from peqa_peft.integrations.outputs import clean_stale_temporaries

    out = tmp_path / "o"
    aside = tmp_path / ".o.old-999999999-x"
    (aside / "previous").mkdir(parents=True)
    (aside / "previous" / "model.safetensors").write_text("earlier export")
    assert clean_stale_temporaries(out) == [aside]
    assert (out / "model.safetensors").read_text() == "earlier export"


def test_a_temporary_directory_of_a_running_process_is_left_alone(tmp_path):
    from peqa_peft.integrations.outputs import clean_stale_temporaries

    live = tmp_path / f".o.tmp-{os.getpid()}-x"
    live.mkdir()
    assert clean_stale_temporaries(tmp_path / "o") == [] and live.exists()


# ------------------------------------------------------------------------------------ paths checked before loading


@pytest.fixture
def adapter_dir(tmp_path):
    """A PEQA adapter of the demo model (only its files matter: the commands must refuse before loading it)."""
    path = tmp_path / "adapter"
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "PEQA"}))
    (path / "adapter_model.safetensors").write_bytes(b"")
    return path


@pytest.fixture
def no_model_loading(monkeypatch):
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the output path was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def unwritable_dir(tmp_path) -> Path:
    """A directory this process cannot create anything in (root ignores permission bits: sysfs then)."""
    if os.geteuid() == 0:
        return Path("/sys")
    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    return ro


def run_cli(argv, capsys) -> str:
    from peqa_peft.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize("case", ["parent-is-a-file", "parent-not-writable", "target-is-a-file"])
def test_export_refuses_an_unusable_output_path_before_loading(tmp_path, case, adapter_dir, no_model_loading, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    out, message = {
        "parent-is-a-file": (afile / "out", f"output path '{afile}/out' cannot be created: '{afile}' is a file"),
        "parent-not-writable": (
            unwritable_dir(tmp_path) / "out",
            f"cannot be written: '{unwritable_dir(tmp_path)}' is not writable",
        ),
        "target-is-a-file": (afile, f"output path '{afile}' exists and is not a directory"),
    }[case]
    argv = ["export", "--model", str(DEMO_LLAMA), "--adapter", str(adapter_dir), "--format", "gguf"]
    err = run_cli(argv + ["--output-dir", str(out)], capsys)
    assert message in err


def test_merged_save_checks_the_path_first(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    _, merged, _ = merged_and_logits()
    with pytest.raises(ValueError, match=f"'{afile}' is a file, not a directory"):
        merged.save_pretrained(afile / "sub")


def test_adapter_directory_without_weights_names_the_missing_file(tmp_path, adapter_dir, no_model_loading, capsys):
    (adapter_dir / "adapter_model.safetensors").unlink()
    message = f"adapter directory '{adapter_dir}/' has no adapter_model.safetensors"
    with pytest.raises(FileNotFoundError, match=message):
        PeftModel.from_pretrained(tiny_llama(), adapter_dir)
    argv = ["export", "--model", str(DEMO_LLAMA), "--adapter", str(adapter_dir), "--format", "gguf"]
    assert message in run_cli(argv + ["--output-dir", str(tmp_path / "out")], capsys)


def test_a_failed_train_removes_the_output_directory_it_created(tmp_path, capsys):
    data = tmp_path / "long.json"
    data.write_text(json.dumps([{"instruction": "word " * 400, "input": "", "output": "yes"}] * 4))
    out = tmp_path / "runs" / "first"
    argv = ["train", "--model", str(DEMO_LLAMA), "--method", "lora", "--no-progress", "--dataset", str(data)]
    err = run_cli(argv + ["--seq-len", "16", "--output-dir", str(out), "--max-steps", "1"], capsys)
    assert "no training example keeps a response token" in err
    assert not (tmp_path / "runs").exists()
