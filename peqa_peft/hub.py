"""Model cards and Hub uploads for peqa_peft adapters."""

from __future__ import annotations

import os
import tempfile
from typing import Optional

from huggingface_hub import HfApi, ModelCard

_SECTION_HEADING = "## Quantization-aware adapter (peqa_peft)"


def _describe(config) -> list[str]:
    method = str(getattr(config.peft_type, "value", config.peft_type))
    lines = [f"- method: {method}"]
    for attr in ("bits", "group_size", "init_method", "train_zero_point"):
        if hasattr(config, attr):
            value = getattr(config, attr)
            if attr == "group_size" and value is None:
                value = "none (per output channel)"
            lines.append(f"- {attr}: {value}")
    lines.append(f"- base model: {config.base_model_name_or_path or 'unknown'}")
    return lines


def add_method_section(output_dir: str, configs: list, model=None) -> None:
    """Add (or refresh) a section in ``output_dir/README.md`` naming method, bits, group size and base model."""
    path = os.path.join(output_dir, "README.md")
    card = ModelCard.load(path) if os.path.exists(path) else ModelCard("")
    text = card.text.split(_SECTION_HEADING)[0].rstrip()
    body = [_SECTION_HEADING, ""]
    for config in configs:
        body += _describe(config) + [""]
    body.append(
        "Load with `import peqa_peft` (registers the method with PEFT) followed by "
        "`PeftModel.from_pretrained(base_model, <this repo>)`."
    )
    card.text = text + "\n\n" + "\n".join(body) + "\n"
    tags = set(card.data.tags or [])
    tags.update({"peqa_peft"} | {str(getattr(c.peft_type, "value", c.peft_type)).lower() for c in configs})
    card.data.tags = sorted(tags)
    if configs and configs[0].base_model_name_or_path:
        card.data.base_model = configs[0].base_model_name_or_path
    card.save(path)


def push_adapter_to_hub(
    model,
    repo_id: str,
    commit_message: Optional[str] = None,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    **save_kwargs,
):
    """Save the adapter(s) of ``model`` into a temporary folder and upload exactly those files with their card.

    This is what ``PeftModel.push_to_hub`` does for peqa_peft methods (see :mod:`peqa_peft.peft_integration`).
    """
    save_kwargs.pop("max_shard_size", None)
    save_kwargs.pop("tags", None)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp_dir:
        model.save_pretrained(tmp_dir, **save_kwargs)
        if revision is not None and not revision.startswith("refs/pr"):
            api.create_branch(repo_id=repo_id, branch=revision, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=tmp_dir,
            commit_message=commit_message or f"Upload {type(model).__name__} adapter",
            revision=revision,
            create_pr=create_pr,
        )
