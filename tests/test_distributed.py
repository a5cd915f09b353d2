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


def _run(launcher: list[str], method: str, batch: int, out) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = ["--model", str(DEMO_LLAMA), "--method", method, "--per-device-batch", str(batch), "--out", str(out)]
    proc = subprocess.run([*launcher, str(WORKER), *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def _torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531"]


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
    cmd = [*_torchrun(), str(worker), "--model", str(DEMO_LLAMA), "--method", method, "--out", str(out)]
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


@pytest.mark.slow
def test_qft_under_fsdp2_is_refused_with_a_clear_error(tmp_path):
    ranks = _fsdp2("qft", tmp_path)
    assert all("does not support FSDP2" in r.get("error", "") for r in ranks), ranks
