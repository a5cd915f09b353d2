"""Model cards and Hub uploads for peqa_peft adapters."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

from huggingface_hub import HfApi, ModelCard

METHOD_HEADING = "## Quantization-aware adapter (peqa_peft)"
TRAINING_HEADING = "## Training and evaluation (peqa_peft)"
# What a pushed training run consists of: the adapter, its card and the run summary (not optimizer checkpoints).
UPLOAD_PATTERNS = ["adapter_config.json", "adapter_model.safetensors", "README.md", "train_summary.json"]


def _set_section(output_dir: str, heading: str, lines: list[str], tags=(), base_model: Optional[str] = None) -> None:
    """Write (or replace) the section ``heading`` of ``output_dir/README.md``, keeping everything else."""
    path = os.path.join(output_dir, "README.md")
    card = ModelCard.load(path) if os.path.exists(path) else ModelCard("")
    text = card.text
    if heading in text:
        before, _, after = text.partition(heading)
        rest = after.split("\n## ", 1)
        text = before.rstrip() + ("\n\n## " + rest[1] if len(rest) > 1 else "")
    card.text = text.rstrip() + "\n\n" + "\n".join([heading, "", *lines]) + "\n"
    card.data.tags = sorted(set(card.data.tags or []) | set(tags))
    if base_model:
        card.data.base_model = base_model
    card.save(path)


def _method_name(config) -> str:
    return str(getattr(config.peft_type, "value", config.peft_type))


def _describe(config) -> list[str]:
    lines = [f"- method: {_method_name(config)}"]
    for attr in ("bits", "group_size", "init_method", "train_zero_point", "outlier_fraction", "int8_gradients"):
        if hasattr(config, attr):
            value = getattr(config, attr)
            if attr == "group_size" and value is None:
                value = "none (per output channel)"
            lines.append(f"- {attr}: {value}")
    tied = getattr(config, "tied_embeddings", None)
    if tied:
        how = "one integer weight shared by" if tied == "integer" else "one float weight (not quantized) shared by"
        lines.append(f"- tied input/output embeddings: {tied} ({how} the embedding lookup and the output head)")
    lines.append(f"- base model: {config.base_model_name_or_path or 'unknown'}")
    return lines


def add_method_section(output_dir: str, configs: list, model=None) -> None:
    """Add (or refresh) a card section naming method, bits, group size and base model of each adapter."""
    lines = []
    for config in configs:
        lines += _describe(config) + [""]
    lines.append(
        "Load with `import peqa_peft` (registers the method with PEFT) followed by "
        "`PeftModel.from_pretrained(base_model, <this repo>)`."
    )
    tags = {"peqa_peft"} | {_method_name(c).lower() for c in configs}
    _set_section(output_dir, METHOD_HEADING, lines, tags, configs[0].base_model_name_or_path if configs else None)


def add_training_section(output_dir: str, summary: dict) -> None:
    """Record how an adapter was trained and evaluated (from the run summary of
    ``peqa_peft.workflows.train``) in its card."""
    cfg = summary.get("config", {})
    lines = [
        f"- base model: {summary['model']}",
        f"- method: {summary['method']}"
        + (
            f" ({cfg.get('bits')}-bit, group size {cfg.get('group_size') or 'per channel'})"
            if summary["method"] == "peqa"
            else ""
        ),
        f"- dataset: {summary['dataset']}",
        f"- steps: {summary['steps']}, learning rate {cfg.get('learning_rate')}, batch {cfg.get('batch_size')} x "
        f"{cfg.get('grad_accum')} accumulation, sequence length {cfg.get('seq_len')}, seed {cfg.get('seed')}",
        f"- final training loss: {summary['train_loss']:.4f}",
        f"- trainable parameters: {summary['trainable_params']:,}",
    ]
    for name, res in summary.get("eval", {}).items():
        lines.append(
            f"- {name} perplexity: {res['perplexity']:.3f} ({res['tokens']} tokens, {res['seq_len']}-token "
            "non-overlapping windows)"
        )
    _set_section(output_dir, TRAINING_HEADING, lines, {"peqa_peft", summary["method"]})


def push_folder_to_hub(
    folder: str,
    repo_id: str,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    commit_message: str = "Upload adapter",
    commit_description: Optional[str] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    allow_patterns: Optional[list[str]] = UPLOAD_PATTERNS,
):
    """Upload ``folder``'s adapter files, card and run summary (not checkpoints) to ``repo_id``.

    ``allow_patterns=None`` uploads everything in the folder.
    """
    if not any(Path(folder).rglob("adapter_config.json")):
        raise FileNotFoundError(f"{folder} holds no adapter_config.json; nothing to push")
    return upload_folder(
        folder,
        repo_id,
        private=private,
        token=token,
        commit_message=commit_message,
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
        allow_patterns=allow_patterns,
    )


def upload_folder(
    folder: str,
    repo_id: str,
    *,
    commit_message: str,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    commit_description: Optional[str] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    allow_patterns: Optional[list[str]] = None,
):
    """The one Hub upload of peqa_peft: create ``repo_id`` (and the branch ``revision``) if needed and upload
    ``folder`` (the files matching ``allow_patterns``; None: all) in one commit. Returns the commit info.

    Used for adapters (:func:`push_folder_to_hub`) and for merged compressed-tensors models
    (:func:`peqa_peft.integrations.formats.compressed_tensors.merged.push_to_hub`).
    """
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id=repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        allow_patterns=allow_patterns,
        commit_message=commit_message,
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
    )


def push_adapter_to_hub(
    model,
    repo_id: str,
    commit_message: Optional[str] = None,
    commit_description: Optional[str] = None,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    **save_kwargs,
):
    """Save the adapter(s) of ``model`` into a temporary folder and upload exactly those files with their card.

    This is what ``PeftModel.push_to_hub`` does for peqa_peft methods (see
    :mod:`peqa_peft.integrations.peft.registration`).
    """
    save_kwargs.pop("max_shard_size", None)
    save_kwargs.pop("tags", None)
    with tempfile.TemporaryDirectory() as tmp_dir:
        model.save_pretrained(tmp_dir, **save_kwargs)
        return push_folder_to_hub(
            tmp_dir,
            repo_id,
            private=private,
            token=token,
            commit_message=commit_message or f"Upload {type(model).__name__} adapter",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
            allow_patterns=None,  # everything save_pretrained wrote, including other adapters' subfolders
        )
