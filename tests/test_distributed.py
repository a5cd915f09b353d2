"""Multi-process training on CPU with gloo: QFT and PEQA under DDP through transformers' Trainer.

Each run trains the bundled demo model for a few steps in order (tests/workers/trainer_worker.py): one process at
global batch 4, and 2 ranks at 2 per rank, launched by ``torchrun`` or ``accelerate launch``. Ranks must end
bit-identical and the losses match the single process up to float summation order.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import DEMO_LLAMA, REPO, tiny_llama
from peft import get_peft_model

from peqa_peft import IntLion, QftConfig
from peqa_peft.tuners.qft import QftWeight

WORKER = REPO / "tests" / "workers" / "trainer_worker.py"
# accelerate's MULTI_CPU type launches through MPI (mpirun), which is not installed here; its multi-process launcher
# (MULTI_GPU: torch's elastic launcher) runs on CPU too, each process using gloo because Trainer has use_cpu=True.
ACCELERATE_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: 1
num_processes: 2
machine_rank: 0
main_training_function: main
mixed_precision: 'no'
rdzv_backend: static
same_network: true
gpu_ids: all
use_cpu: false
"""


def _run(launcher: list[str], method: str, batch: int, out, *extra: str) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = ["--model", str(DEMO_LLAMA), "--method", method, "--per-device-batch", str(batch), "--out", str(out)]
    args += list(extra)
    proc = subprocess.run([*launcher, str(WORKER), *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def _torchrun(port: int = 29531) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]


def _check_against_one_process(ranks: list[dict], single: dict, rel: float) -> None:
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["digest"] == ranks[1]["digest"]  # ranks bit-identical
    assert ranks[0]["losses"] == ranks[1]["losses"]
    assert len(ranks[0]["losses"]) == len(single["losses"]) == 4
    for multi, one in zip(ranks[0]["losses"], single["losses"]):
        assert abs(multi - one) <= rel * abs(one), (ranks[0]["losses"], single["losses"])


@pytest.fixture(scope="module")
def one_process_qft(tmp_path_factory):
    return _run([sys.executable], "qft", 4, tmp_path_factory.mktemp("qft1"))[0]


@pytest.mark.slow
def test_qft_ddp_torchrun_trainer_matches_one_process(one_process_qft, tmp_path):
    ranks = _run(_torchrun(), "qft", 2, tmp_path)
    assert all(r["ddp_ignored"] > 0 for r in ranks)  # the integer weights stay out of DDP's float buckets
    # The gradients are averaged in float before int8 quantization: equal to one process up to summation order,
    # which can flip a rounding; four steps stay within 1e-4.
    _check_against_one_process(ranks, one_process_qft, rel=1e-4)


@pytest.mark.slow
def test_qft_ddp_int8_gradient_sync_keeps_ranks_identical(one_process_qft, tmp_path):
    ranks = _run(_torchrun(29539), "qft", 2, tmp_path, "--ddp-gradient-sync", "int8")
    # int8 codes travel instead of fp32 sums: the gradient is rounded twice, so the losses may leave one process's
    # by more than summation order (measured: 6e-5 relative after 4 steps), while the ranks stay bit-identical.
    _check_against_one_process(ranks, one_process_qft, rel=1e-3)
    fp32 = _run(_torchrun(29541), "qft", 2, tmp_path / "fp32")
    assert fp32[0]["digest"] != ranks[0]["digest"]  # the int8 sync really ran


@pytest.mark.slow
def test_qft_ddp_accelerate_launch_matches_one_process(one_process_qft, tmp_path):
    config = tmp_path / "accelerate.yaml"
    config.write_text(ACCELERATE_CONFIG)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    launcher += ["--main_process_port", "29533"]
    _check_against_one_process(_run(launcher, "qft", 2, tmp_path / "out"), one_process_qft, rel=1e-4)


@pytest.mark.slow
def test_peqa_ddp_torchrun_trainer_matches_one_process(tmp_path):
    single = _run([sys.executable], "peqa", 4, tmp_path / "one")[0]
    _check_against_one_process(_run(_torchrun(), "peqa", 2, tmp_path / "two"), single, rel=1e-5)


def test_moving_a_qft_model_to_its_own_device_keeps_the_optimizer_params():
    # accelerate moves the model after Trainer built the optimizer; a re-wrapped QftWeight would leave the optimizer
    # holding parameters that never get a gradient again (the QFT weights silently stop training).
    model = get_peft_model(tiny_llama(), QftConfig(task_type="CAUSAL_LM"))
    before = [p for p in model.parameters() if isinstance(p, QftWeight)]
    optimizer = IntLion(model.parameters(), lr=1e-3)
    model.to(torch.device("cpu"))
    model.to(torch.float32)
    assert [p for p in model.parameters() if isinstance(p, QftWeight)] == before
    ids = torch.randint(0, 128, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for group in optimizer.param_groups for p in group["params"])


def _fsdp2(method: str, out) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    worker = REPO / "tests" / "workers" / "fsdp2_worker.py"
    port = {"peqa": 29535, "qft": 29537}[method]  # a port per run: a just-closed one can still be held
    cmd = [*_torchrun(port), str(worker), "--model", str(DEMO_LLAMA), "--method", method, "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


@pytest.mark.slow
def test_peqa_under_fsdp2_saves_a_gathered_adapter_that_reloads(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ranks = _fsdp2("peqa", tmp_path)
    assert all("error" not in r and len(r["losses"]) == 2 for r in ranks), ranks
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DEMO_LLAMA), tmp_path / "adapter")
    with torch.no_grad():
        logits = reloaded(input_ids=torch.arange(16).view(1, 16)).logits
    assert torch.allclose(logits, torch.load(tmp_path / "logits.pt"), atol=1e-4)


def _one_process_qft_step():
    """The QFT model, its float gradients at the global batch, and its state after one IntLion step (one process)."""
    from transformers import AutoModelForCausalLM
    from workers.fsdp2_worker import GLOBAL_BATCH, QFT_LR

    from peqa_peft.tuners.qft import QftWeight

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(DEMO_LLAMA, dtype=torch.float32)
    model = get_peft_model(model, QftConfig(task_type="CAUSAL_LM", int8_gradients=False))  # FSDP2 uses float grads
    optimizer = IntLion.from_model(model, lr=QFT_LR)
    model(input_ids=GLOBAL_BATCH, labels=GLOBAL_BATCH).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert isinstance(model.base_model.model.model.embed_tokens.qft_weight["default"], QftWeight)
    optimizer.step()
    return model, grads


@pytest.mark.slow
def test_qft_under_fsdp2_matches_one_process_and_saves_a_gathered_adapter(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ranks = _fsdp2("qft", tmp_path)
    # Each rank stores half of every integer weight's codes: the integer storage stays sharded.
    assert all(2 * r["local_codes"] == r["full_codes"] > 0 for r in ranks), ranks
    model, grads = _one_process_qft_step()
    # Forward on all-gathered integer weights and reduce-scattered gradients: equal to one process at the global
    # batch up to float summation order.
    fsdp_grads = torch.load(tmp_path / "grads.pt")
    assert set(fsdp_grads) == set(grads)
    for name, grad in grads.items():
        torch.testing.assert_close(fsdp_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)
    # One IntLion step on each rank's rows: the same update; only the stochastic rounding noise differs (each rank
    # draws its own), so codes may differ by one step, while outliers (updated in float) and norms agree.
    after = torch.load(tmp_path / "step1.pt")
    mine = model.state_dict()
    assert set(after) == set(mine)
    for key, value in mine.items():
        other = after[key]
        if key.endswith(".codes"):
            diff = (other.int() - value.int()).abs()
            assert diff.max() <= 1 and diff.float().mean() < 0.5, key
        elif key.endswith((".zero_point", ".outlier_idx")):
            assert torch.equal(other, value), key
        else:
            torch.testing.assert_close(other, value, rtol=1e-5, atol=1e-6, msg=key)
    # The gathered adapter reloads (in this process, without FSDP) to the sharded model's logits.
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DEMO_LLAMA), tmp_path / "adapter")
    with torch.no_grad():
        logits = reloaded(input_ids=torch.arange(16).view(1, 16)).logits
    assert torch.equal(logits, torch.load(tmp_path / "logits.pt"))
