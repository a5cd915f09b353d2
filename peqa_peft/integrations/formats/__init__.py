"""Export a PEQA-tuned model as a standard low-bit checkpoint that other engines load without peqa_peft.

``export(model, output_dir, format=...)`` merges the active PEQA scale deltas into ``s0`` (without modifying
``model``) and writes the integer codes exactly as they are — never re-quantized, no float weight needed:

- ``"compressed-tensors"``: ``pack-quantized`` asymmetric integer weights, one file for vLLM and transformers;
- ``"gguf"``: one ``.gguf`` file for llama.cpp / Ollama (Q4_1 / Q5_1 blocks, see :mod:`.gguf`);
- ``"gptq"``: the GPTQ layout (``qweight``/``qzeros``/``scales``/``g_idx``) read by GPTQModel and transformers.

The output directory is written atomically (a temporary directory beside it, renamed at the end), so a failed export
leaves nothing behind and the result holds no file of an earlier export; temporary directories of killed exports are
removed by the next export to the same target. Every check (output path usable and writable, existing output, format
limits, tokenizer) runs before anything is written, and in ``export_adapter`` the path and adapter checks run before
any model is loaded (:mod:`peqa_peft.integrations.outputs`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from ._common import ExportModel, atomic_output_dir, check_output_dir, collect, load_tokenizer

FORMATS = ("compressed-tensors", "gguf", "gptq")

__all__ = ["FORMATS", "ExportModel", "collect", "export", "export_adapter"]


def _writer(fmt: str):
    if fmt == "compressed-tensors":
        from .compressed_tensors import writer
    elif fmt == "gguf":
        from .gguf import writer
    elif fmt == "gptq":
        from .gptq import writer
    else:
        raise ValueError(f"unknown export format '{fmt}'; choose one of {', '.join(FORMATS)}")
    return writer


def export(
    model: nn.Module,
    output_dir: str | os.PathLike,
    format: str = "compressed-tensors",
    tokenizer: Any = None,
    overwrite: bool = False,
    **options: Any,
) -> Path:
    """Write the merged PEQA ``model`` to ``output_dir`` in ``format``; returns the output directory.

    Args:
        model: a ``PeftModel`` with PEQA adapters (the active ones are merged) or a ``merge_and_unload()`` result.
        output_dir: created; an existing non-empty directory is refused unless ``overwrite=True``.
        format: one of :data:`FORMATS`.
        tokenizer: a tokenizer or its path; default: the one saved beside the base model (required).
        overwrite: replace an existing ``output_dir`` (only after the new export has been written completely).
        options: format-specific keyword arguments (``scale_dtype`` and ``target="any"|"vllm-cpu"`` for
            compressed-tensors, ``float_type`` / ``pre_tokenizer`` for gguf, ``checkpoint_format`` for gptq). A model
            loaded with ``peqa_peft.load_gguf`` is exported to ``format="gguf"`` by rewriting its source file
            (:mod:`peqa_peft.integrations.formats.gguf.source_writer`; options ``k_quants="exact"|"requantize"``).
    """
    if format == "gguf" and _gguf_source(model) is not None:
        # loaded with peqa_peft.load_gguf: rewrite the source file (same metadata, tensors and types)
        from .gguf import source_writer

        if tokenizer is not None:
            raise ValueError(
                "tokenizer=... does not apply: a model loaded from GGUF keeps the source file's tokenizer"
            )
        check_output_dir(output_dir, overwrite)
        source_writer.validate(model, **options)
        with atomic_output_dir(output_dir, overwrite) as tmp:
            source_writer.write(model, tmp, **options)
        return Path(output_dir)
    writer = _writer(format)
    check_output_dir(output_dir, overwrite)
    exported = collect(model)
    writer.validate(exported, **options)
    tok = load_tokenizer(model, tokenizer)
    with atomic_output_dir(output_dir, overwrite) as tmp:
        writer.write(exported, tmp, tokenizer=tok, **options)
        if format != "gguf":
            tok.save_pretrained(tmp)
            if exported.generation_config is not None:
                exported.generation_config.save_pretrained(tmp)
    return Path(output_dir)


def _gguf_source(model: nn.Module):
    from .gguf.reader import gguf_source

    return gguf_source(model)


def export_adapter(
    base_model: str,
    adapter: str,
    output_dir: str | os.PathLike,
    format: str = "compressed-tensors",
    tokenizer: Any = None,
    overwrite: bool = False,
    **options: Any,
) -> Path:
    """Load ``base_model`` + the PEQA ``adapter`` (paths or Hub ids) and :func:`export` the merged model.

    Cheap checks (format, options, output directory) run before the model is loaded.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ..peft.registration import check_local_adapter

    _writer(format)
    check_output_dir(output_dir, overwrite)
    check_local_adapter(str(adapter))
    if str(base_model).endswith(".gguf"):
        from .gguf.reader import load_gguf

        base = load_gguf(base_model)
    else:
        base = AutoModelForCausalLM.from_pretrained(base_model)
    model = PeftModel.from_pretrained(base, adapter)
    if str(base_model).endswith(".gguf"):  # the source file holds the tokenizer
        return export(model, output_dir, format, tokenizer=tokenizer, overwrite=overwrite, **options)
    return export(model, output_dir, format, tokenizer=tokenizer or base_model, overwrite=overwrite, **options)
