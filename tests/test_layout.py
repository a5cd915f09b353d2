"""The package layout: old import paths still work (same module, with a DeprecationWarning) and importing the package
is quiet."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from peqa_peft import _deprecated

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("old", sorted(_deprecated.MOVED))
def test_old_import_path_is_the_new_module_with_a_deprecation_warning(old):
    new = _deprecated.MOVED[old]
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert module.__spec__.name == new  # the alias does not leave its own spec on the real module


def test_old_submodule_of_a_moved_package_resolves_below_its_new_home():
    sys.modules.pop("peqa_peft.quant.kernels", None)
    with pytest.warns(DeprecationWarning, match="peqa_peft.quant.kernels moved to peqa_peft.core.kernels"):
        kernels = importlib.import_module("peqa_peft.quant.kernels")
    assert kernels is importlib.import_module("peqa_peft.core.kernels")


def test_importing_the_package_prints_nothing():
    """No bitsandbytes kernel-hub warning (PEFT imports bitsandbytes) nor anything else on a plain import."""
    out = subprocess.run(
        [sys.executable, "-c", "import peqa_peft"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "" and out.stderr == "", out.stderr


def test_core_calls_distributed_code_through_registered_hooks():
    from peqa_peft.core.qft import hooks
    from peqa_peft.integrations.distributed import ddp, fsdp

    assert hooks._HOOKS["sync_grad_chunk"] is ddp.sync_grad_chunk_
    assert hooks.fsdp() is fsdp
