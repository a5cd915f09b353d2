"""Old import paths of modules that moved in the package re-layout, kept working with a ``DeprecationWarning``.

``import peqa_peft.quant`` (or ``from peqa_peft.train import train``) imports the module's new home and binds the
*same module object* under the old name, so attributes read or patched through either name are one and the same.
An alias module instead of a re-exporting file at the old path keeps ``git`` rename detection intact for the moved
files. The table is the public record of the move (also in ``docs_snippets/layout.md``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

# old module -> new module; an old package maps its whole subtree unless a longer entry says otherwise
MOVED = {
    "peqa_peft.quant": "peqa_peft.core",
    "peqa_peft.quant.hf_quantizer": "peqa_peft.integrations.transformers.quantizer",
    "peqa_peft.memory": "peqa_peft.core.memory",
    "peqa_peft.utils": "peqa_peft.core.layer_memory",
    "peqa_peft.optim.chunks": "peqa_peft.core.chunks",
    "peqa_peft.tuners.qft.tensor": "peqa_peft.core.qft.tensor",
    "peqa_peft.tuners.qft.embedding": "peqa_peft.core.qft.embedding",
    "peqa_peft.tuners.qft.distributed": "peqa_peft.integrations.distributed.ddp",
    "peqa_peft.tuners.qft.fsdp": "peqa_peft.integrations.distributed.fsdp",
    "peqa_peft.peft_integration": "peqa_peft.integrations.peft.registration",
    "peqa_peft.export": "peqa_peft.integrations.formats",
    "peqa_peft.export.compressed_tensors": "peqa_peft.integrations.formats.compressed_tensors.writer",
    "peqa_peft.export.merged": "peqa_peft.integrations.formats.compressed_tensors.merged",
    "peqa_peft.export.gguf": "peqa_peft.integrations.formats.gguf.writer",
    "peqa_peft.export.gptq": "peqa_peft.integrations.formats.gptq.writer",
    "peqa_peft.hub": "peqa_peft.integrations.hub",
    "peqa_peft.train": "peqa_peft.workflows.train",
    "peqa_peft.evaluate": "peqa_peft.workflows.evaluate",
    "peqa_peft.cli": "peqa_peft.workflows.cli",
    "peqa_peft.data": "peqa_peft.workflows.data",
    "peqa_peft.model_zoo": "peqa_peft.workflows.model_zoo",
}


def new_name(old: str) -> str | None:
    """The new dotted name of ``old``, or None when ``old`` did not move."""
    parts = old.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in MOVED:
            return ".".join([MOVED[prefix], *parts[i:]])
    return None


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module name to its new module (same object), warning once per old name."""

    def find_spec(self, fullname, path=None, target=None):
        if new_name(fullname) is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        target = new_name(spec.name)
        warnings.warn(
            f"{spec.name} moved to {target}; import it from there (the old path will be removed)",
            DeprecationWarning,
            stacklevel=2,
        )
        module = importlib.import_module(target)
        # the import system stamps the alias spec on whatever create_module returns: keep the real one to restore
        self._real_specs[id(module)] = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = self._real_specs.pop(id(module))

    def __init__(self):
        self._real_specs = {}


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (idempotent)."""
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedModuleFinder())
