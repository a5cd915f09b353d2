"""``save_pretrained`` / ``push_to_hub`` for merged PEQA models: a standard compressed-tensors checkpoint with a card.

``merge_and_unload()`` (and ``unload()``) of a PEQA model return the transformers model whose targeted layers are
:class:`~peqa_peft.core.QuantLinear`. transformers' own ``save_pretrained`` would write those layers' private buffers,
which only peqa_peft can read; instead the returned model gets these two methods (bound to that instance only), so
``merged.save_pretrained(dir)`` writes the compressed-tensors checkpoint of :mod:`.compressed_tensors` that plain
``AutoModelForCausalLM.from_pretrained(dir)`` and vLLM load, plus a model card.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import types
from pathlib import Path
from typing import Any, Optional

from torch import nn

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
        "peqa_peft is not needed.",
    ]
    _set_section(str(out_dir), CARD_HEADING, lines, {"peqa_peft", "peqa", "compressed-tensors"}, base)


def save_pretrained(
    self: nn.Module,
    save_directory: str | os.PathLike,
    tokenizer: Any = None,
    scale_dtype=None,
    zero_point_layout: str = "transformers",
    **unused: Any,
) -> list[str]:
    """Write this merged PEQA model as a compressed-tensors checkpoint (+ model card) into ``save_directory``.

    Like transformers' ``save_pretrained`` it writes into an existing directory, replacing only its own files; the
    files are written into a temporary directory first and moved in at the end. Sharding/serialization keyword
    arguments of transformers' method are accepted and ignored (one safetensors file is written).
    """
    from .. import _common
    from . import writer as compressed_tensors

    exported = _common.collect(self)
    compressed_tensors.validate(exported, scale_dtype, zero_point_layout)
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".peqa-save-") as tmp:
        tmp_path = Path(tmp)
        compressed_tensors.write(exported, tmp_path, scale_dtype=scale_dtype, zero_point_layout=zero_point_layout)
        if exported.generation_config is not None:
            exported.generation_config.save_pretrained(tmp_path)
        if tokenizer is not None:
            _common.load_tokenizer(self, tokenizer).save_pretrained(tmp_path)
        if (out / "README.md").exists():
            shutil.copy(out / "README.md", tmp_path / "README.md")  # keep an existing card, refresh our section
        _card(tmp_path, self, exported)
        written = sorted(p.name for p in tmp_path.iterdir())
        for name in written:
            os.replace(tmp_path / name, out / name)
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
        api = hub.HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision is not None and not revision.startswith("refs/pr"):
            api.create_branch(repo_id=repo_id, branch=revision, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=tmp,
            commit_message=commit_message or "Upload PEQA model (compressed-tensors)",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )
