"""``save_pretrained`` / ``push_to_hub`` for merged PEQA models: a standard compressed-tensors checkpoint with a card.

``merge_and_unload()`` (and ``unload()``) of a PEQA model return the transformers model whose targeted layers are
:class:`~peqa_peft.core.QuantLinear`. transformers' own ``save_pretrained`` would write those layers' private buffers,
which only peqa_peft can read; instead the returned model gets these two methods (bound to that instance only), so
``merged.save_pretrained(dir)`` writes the compressed-tensors checkpoint of :mod:`.compressed_tensors` that plain
``AutoModelForCausalLM.from_pretrained(dir)`` and vLLM load, plus a model card. The directory is replaced atomically
and never keeps files of an earlier save (see :func:`save_pretrained`).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import types
from pathlib import Path
from typing import Any, Optional

from torch import nn

from ...outputs import OutputExistsError, atomic_output_dir, check_output_path

CARD_HEADING = "## Quantized with PEQA (peqa_peft)"
MARKER = "_peqa_peft_compressed_save"


def attach_compressed_save(model: nn.Module) -> nn.Module:
    """Give a merged PEQA transformers model ``save_pretrained``/``push_to_hub`` writing compressed-tensors."""
    if getattr(model, "config", None) is None:
        return model
    model.save_pretrained = types.MethodType(save_pretrained, model)
    model.push_to_hub = types.MethodType(push_to_hub, model)
    setattr(model, MARKER, True)
    return model


def _card(out_dir: Path, model: nn.Module, exported) -> None:
    from ...hub import _set_section

    base = getattr(model.config, "_name_or_path", None) or None
    group = exported.group_size or "per output channel"
    lines = [
        f"- format: compressed-tensors `pack-quantized`, {exported.bits}-bit asymmetric integer weights, "
        f"group size {group}, {len(exported.layers)} quantized linear layers (unquantized: "
        f"{', '.join(exported.float_linears) or 'none'})",
        "- produced by merging PEQA scale adapters (Kim et al., NeurIPS 2023) into the quantization scales; the "
        "integer codes are those PEQA quantized once",
        f"- base model: {base or 'unknown'}",
        "",
        "Load with `AutoModelForCausalLM.from_pretrained(<this repo>)` (needs `compressed-tensors`); "
        "peqa_peft is not needed. vLLM serves the same files (checked with vLLM 0.32 on CPU, which needs 4-bit "
        "layers with widths that are multiples of 32).",
    ]
    _set_section(str(out_dir), CARD_HEADING, lines, {"peqa_peft", "peqa", "compressed-tensors"}, base)


# What an existing target directory may hold without being refused (see `save_pretrained`):
# - files of an earlier model save, which the new checkpoint supersedes (dropped): transformers' weights and index
#   files, any shard set, config.json, generation_config.json, and the temporary directories of earlier versions;
_SUPERSEDED = re.compile(
    r"^(config\.json|generation_config\.json|(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)"
    r"|(model\.safetensors|pytorch_model\.bin)\.index\.json|\.peqa-save-.*)$"
)
# - the model card (kept, our section refreshed) and the tokenizer (kept unless a new one is passed).
_TOKENIZER_FILES = frozenset(
    (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "tokenizer.model",
        "spiece.model",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "chat_template.jinja",
        "chat_template.json",
    )
)


def foreign_files(directory: Path) -> list[str]:
    """The entries of ``directory`` that a merged save neither supersedes nor keeps (e.g. an adapter's files)."""
    if not directory.is_dir():
        return []
    return sorted(
        p.name
        for p in directory.iterdir()
        if not (_SUPERSEDED.match(p.name) or p.name == "README.md" or p.name in _TOKENIZER_FILES)
    )


def save_pretrained(
    self: nn.Module,
    save_directory: str | os.PathLike,
    tokenizer: Any = None,
    scale_dtype=None,
    target: str = "any",
    overwrite: bool = False,
    **unused: Any,
) -> list[str]:
    """Write this merged PEQA model as a compressed-tensors checkpoint (+ model card) into ``save_directory``.

    The checkpoint is written into a fresh temporary directory beside ``save_directory``, which then replaces it in
    one rename, so the result never mixes in files of an earlier save (an older shard set, an adapter) and a failed
    or killed save leaves the previous directory as it was. Of the existing directory's files, the model card
    (``README.md``, our section refreshed) and the tokenizer files (unless ``tokenizer`` is given) are carried
    over; the weights and configs of an earlier model save are superseded. Any other file (e.g. an adapter's
    ``adapter_config.json``) is refused up front, before anything is written: pass ``overwrite=True`` to replace
    the whole directory (then nothing is carried over). Sharding/serialization keyword arguments of transformers'
    method are accepted and ignored (one safetensors file is written). ``target="vllm-cpu"`` refuses, before anything
    is written, layers vLLM cannot serve on CPU (see :mod:`.writer`); the file is the same either way.
    """
    from .. import _common
    from . import writer as compressed_tensors

    out = check_output_path(save_directory)
    foreign = foreign_files(out)
    if foreign and not overwrite:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputExistsError(
            f"'{save_directory}' holds files that are not part of a model save ({shown}); a merged save would leave "
            "them beside the new checkpoint. Pass overwrite=True to replace the whole directory, or save elsewhere"
        )
    exported = _common.collect(self)
    compressed_tensors.validate(exported, scale_dtype, target)
    tok = _common.load_tokenizer(self, tokenizer) if tokenizer is not None else None
    with atomic_output_dir(out, overwrite=True) as tmp:
        compressed_tensors.write(exported, tmp, scale_dtype=scale_dtype, target=target)
        if exported.generation_config is not None:
            exported.generation_config.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
        if not overwrite:  # carry over the card and (unless replaced) the tokenizer
            keep = {"README.md"} | (_TOKENIZER_FILES if tok is None else set())
            for name in sorted(keep):
                if (out / name).is_file() and not (tmp / name).exists():
                    shutil.copy2(out / name, tmp / name)
        _card(tmp, self, exported)
        written = sorted(p.name for p in tmp.iterdir())
    return [str(out / name) for name in written]


def push_to_hub(
    self: nn.Module,
    repo_id: str,
    commit_message: Optional[str] = None,
    commit_description: Optional[str] = None,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    tokenizer: Any = None,
    **save_kwargs: Any,
):
    """Save the compressed-tensors checkpoint and card into a temporary folder and upload exactly those files."""
    from ... import hub

    with tempfile.TemporaryDirectory() as tmp:
        self.save_pretrained(tmp, tokenizer=tokenizer, **save_kwargs)
        return hub.upload_folder(
            tmp,
            repo_id,
            private=private,
            token=token,
            commit_message=commit_message or "Upload PEQA model (compressed-tensors)",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )
