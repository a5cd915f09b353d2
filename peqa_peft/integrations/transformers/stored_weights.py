"""The float weights a transformers model was loaded from, read back from its safetensors files.

PEQA quantizes a weight as stored (float32 for most checkpoints), not a bfloat16/float16 rounding of it: the codes,
scales and so an adapter's base fingerprint are then the same whatever dtype the base is loaded in, and an adapter
trained on a float32 base loads onto ``from_pretrained(..., dtype=torch.bfloat16)`` of the same checkpoint.

A stored tensor is used only when it is *the same weight at a higher precision*: its cast to the loaded dtype equals
the loaded weight bit for bit. A weight changed in memory (merged, edited, re-initialised) or a checkpoint that
cannot be found (a model built from a config, a Hub id not in the local cache) falls back to the loaded weight,
exactly as before.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ...core.linear import is_transposed_linear

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PRECISE_DTYPES = ("F32", "F64")  # safetensors header names of the dtypes more precise than a 16-bit loaded weight


def _local_files(name_or_path: str) -> list[Path]:
    """The safetensors files of a local checkpoint directory or of a Hub id already in the local cache."""
    if not name_or_path:
        return []
    directory = Path(name_or_path).expanduser()
    if not directory.is_dir():
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - huggingface_hub is a transformers dependency
            return []
        for filename in (INDEX, SINGLE):
            try:
                cached = try_to_load_from_cache(name_or_path, filename)
            except ValueError:  # not a valid repo id (e.g. a path that does not exist)
                return []
            if isinstance(cached, (str, os.PathLike)):
                directory = Path(cached).parent
                break
        else:
            return []
    index = directory / INDEX
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / f for f in files if (directory / f).is_file()]
    return [directory / SINGLE] if (directory / SINGLE).is_file() else []


def checkpoint_files(model: nn.Module) -> list[Path]:
    """The safetensors files ``model`` was loaded from (``name_or_path``): a local directory or the Hub cache."""
    name = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    return _local_files(str(name or ""))


def tensor_index(files: list[Path]) -> dict[str, Path]:
    """Tensor name -> the file holding it, from the safetensors headers only."""
    from safetensors import safe_open

    index: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            index.update(dict.fromkeys(handle.keys(), file))
    return index


def checkpoint_module_names(model: nn.Module, key: str) -> list[str]:
    """Checkpoint names for module ``key``: as it is, and without/with the base model's prefix."""
    names = [key]
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and key.startswith(prefix + "."):
        names.append(key[len(prefix) + 1 :])
    elif prefix:
        names.append(f"{prefix}.{key}")
    return names


class StoredWeights:
    """Lazy access to the stored weights of ``model`` (``model.name_or_path``), one tensor at a time (memory-mapped).

    :meth:`weight_for` returns the stored weight of a linear layer when it is the loaded weight at a higher
    precision, else ``None``; :attr:`used` counts the layers it served.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._keys: Optional[dict[str, Path]] = None
        self.used = 0

    @staticmethod
    def wanted(module: nn.Module) -> bool:
        """Whether a stored copy could be more precise than the loaded weight (a 16-bit float weight)."""
        if not (isinstance(module, nn.Linear) or is_transposed_linear(module)):
            return False
        weight = getattr(module, "weight", None)
        half = (torch.bfloat16, torch.float16)
        return isinstance(weight, torch.Tensor) and not weight.is_meta and weight.dtype in half

    def _index(self) -> dict[str, Path]:
        if self._keys is None:
            self._keys = tensor_index(checkpoint_files(self.model))
        return self._keys

    def _candidates(self, key: str) -> list[str]:
        """Checkpoint names of module ``key``'s weight (see :func:`checkpoint_module_names`)."""
        return [f"{name}.weight" for name in checkpoint_module_names(self.model, key)]

    @torch.no_grad()
    def weight_for(self, key: str, module: nn.Module) -> Optional[torch.Tensor]:
        """The stored weight of module ``key`` if it rounds to the loaded one, at a higher precision; else ``None``."""
        if not self.wanted(module):
            return None
        index = self._index()
        name = next((n for n in self._candidates(key) if n in index), None)
        if name is None:
            return None
        from safetensors import safe_open

        loaded = module.weight
        with safe_open(str(index[name]), framework="pt") as handle:
            # the header's dtype first: a checkpoint stored in 16 bits (most on the Hub) is never read
            if handle.get_slice(name).get_dtype() not in PRECISE_DTYPES:
                return None
            stored = handle.get_tensor(name)
        if stored.shape != loaded.shape or not torch.equal(stored.to(loaded.dtype), loaded.cpu()):
            return None
        self.used += 1
        return stored.to(loaded.device)


__all__ = ["StoredWeights", "checkpoint_files", "checkpoint_module_names", "tensor_index"]
