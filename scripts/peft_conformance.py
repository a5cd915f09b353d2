"""Run PEFT's own custom-model test battery (``TestPeftCustomModel``) with PEQA cases in place of its TEST_CASES.

    pip download peft==0.21.2 --no-binary :all: --no-deps -d /tmp/peftsrc      # PEFT's source distribution, once
    python scripts/peft_conformance.py --sdist /tmp/peftsrc/peft-0.21.2.tar.gz [-- extra pytest args]

The script copies ``tests/test_custom_models.py`` and its helpers out of the sdist into a temporary package, swaps
the ``TEST_CASES`` list for the PEQA cases below (MLPs with biases at 2/3/4/8 bits, per channel and per group,
``modules_to_save``, a trained zero-point, GPT-2-style ``Conv1D``) and runs ``pytest -k "TestPeftCustomModel and
PEQA"`` there. PEFT's test code is read from the sdist at run time and never committed. Tests that still fail by
design are listed in the README ("PEFT conformance").
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FILES = ("test_custom_models.py", "testing_common.py", "testing_utils.py")

PEQA_CASES = """
from peqa_peft import PeqaConfig

TEST_CASES = [
    ("Vanilla MLP 1 PEQA", "MLP", PeqaConfig, {"target_modules": ["lin0"], "bits": 4}),
    ("Vanilla MLP 2 PEQA", "MLP", PeqaConfig, {"target_modules": ["lin1"], "bits": 4}),
    ("Vanilla MLP 3 PEQA", "MLP", PeqaConfig, {"target_modules": ["lin0", "lin1"], "bits": 2}),
    ("Vanilla MLP 4 PEQA", "MLP", PeqaConfig, {"target_modules": ["lin0", "lin1"], "bits": 3}),
    ("Vanilla MLP 5 PEQA", "MLP", PeqaConfig, {"target_modules": ["lin0", "lin1"], "bits": 8}),
    ("Vanilla MLP 6 PEQA", "MLP", PeqaConfig, {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 7 PEQA", "MLP", PeqaConfig, {"target_modules": ["lin0", "lin1"], "group_size": 5}),
    ("Vanilla MLP 8 PEQA", "MLP", PeqaConfig, {"target_modules": ["lin0"], "train_zero_point": True}),
    ("Vanilla MLP 9 PEQA", "MLP_LayerNorm", PeqaConfig, {"target_modules": ["lin0", "lin1"], "bits": 4}),
    ("Vanilla MLP 10 PEQA", "MLP2", PeqaConfig, {"target_modules": ["lin0", "lin1"], "group_size": 2}),
    ("Embedding + transformers Conv1D 1 PEQA", "EmbConv1D", PeqaConfig, {"target_modules": ["conv1d"]}),
    ("Embedding + transformers Conv1D 2 PEQA", "EmbConv1D", PeqaConfig, {"target_modules": ["conv1d", "lin0"]}),
]
"""


def prepare(sdist: Path, workdir: Path) -> Path:
    """Extract PEFT's test files into ``workdir/peft_tests`` with the PEQA cases swapped in."""
    package = workdir / "peft_tests"
    package.mkdir()
    (package / "__init__.py").write_text("")
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = Path(member.name)
            if name.parent.name == "tests" and name.name in FILES:
                (package / name.name).write_bytes(tar.extractfile(member).read())
    missing = [f for f in FILES if not (package / f).exists()]
    if missing:
        raise FileNotFoundError(f"{sdist} has no tests/{missing[0]}")
    source = (package / "test_custom_models.py").read_text()
    pattern = re.compile(r"^TEST_CASES = \[\n.*?^\]\n", re.S | re.M)
    if not pattern.search(source):
        raise ValueError("could not find TEST_CASES in test_custom_models.py (another PEFT version?)")
    source = pattern.sub(lambda _: "import peqa_peft  # registers PEQA with PEFT\n" + PEQA_CASES, source, count=1)
    (package / "test_custom_models.py").write_text(source)
    # testing_common imports diffusers only for isinstance checks against its pipeline class, which no custom-model
    # test builds; a local class of that name keeps the battery runnable without installing diffusers.
    common = (package / "testing_common.py").read_text()
    no_diffusers = "class StableDiffusionPipeline:  # diffusers is not installed (see peft_conformance.py)\n    pass\n"
    try:
        import diffusers  # noqa: F401
    except ImportError:
        common = common.replace("from diffusers import StableDiffusionPipeline\n", no_diffusers, 1)
    (package / "testing_common.py").write_text(common)
    return package


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdist", type=Path, default=Path("/tmp/peftsrc/peft-0.21.2.tar.gz"))
    parser.add_argument("pytest_args", nargs="*", help="extra arguments for pytest (after --)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        package = prepare(args.sdist, Path(tmp))
        cmd = [sys.executable, "-m", "pytest", str(package / "test_custom_models.py"), "-p", "no:cacheprovider"]
        cmd += ["-k", "TestPeftCustomModel and PEQA", "-q", "-rf", "--rootdir", tmp, *args.pytest_args]
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
        return subprocess.run(cmd, cwd=tmp, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
