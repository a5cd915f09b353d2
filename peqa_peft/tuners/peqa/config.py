"""Configuration of PEQA adapters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.utils import PeftType

from ...core.quantizer import validate_quant_settings
from .._base import QuantTargetsConfig


@dataclass
class PeqaConfig(QuantTargetsConfig):
    """Configuration of a [`PeqaModel`]: which linear layers to quantize and how, and how the scales are tuned.

    PEQA (Kim et al., 2023, "Memory-Efficient Fine-Tuning of Compressed Large Language Models via sub-4-bit Integer
    Quantization") quantizes every targeted linear weight once to ``bits``-bit integers and then fine-tunes only the
    quantization scales: ``W_hat = (s0 + delta_s) * (clamp(round(W0 / s0) + z0, 0, 2^b - 1) - z0)``. The adapter is
    ``delta_s`` (``out_features x n_groups`` values per layer).

    Args:
        bits: weight bit width, 2..8 (the paper uses 3 and 4).
        group_size: ``"auto"`` (default), ``None`` for one scale per output channel (the paper's main setting,
            measured on LLaMA-7B..65B), or the number of input columns sharing a scale (e.g. 32, 64, 128; must divide
            every targeted layer's ``in_features``). ``"auto"`` is group 32 when 32 divides every targeted layer's
            ``in_features`` (real LLMs), else per output channel for the whole model (e.g. the bundled demo model's
            688-wide ``down_proj``); at the default init the 4-bit initialization costs x1.73 WikiText-2 perplexity
            per channel, x1.38 at group 64 and x1.16 at group 32 on SmolLM2-135M, x2.51 / x1.27 / x0.99 on Gemma 3
            270M (``benchmarks/real_models.py``). It is resolved when
            the layers are quantized and the concrete value replaces ``"auto"`` in this config (and so in the saved
            adapter, which therefore reloads onto the identical grid); already quantized layers keep their grid.
        init_method: how ``s0``/``z0`` are chosen: ``"auto"`` (default) is ``"mse"`` with groups and ``"minmax"``
            per output channel (measured on real models: see :func:`~peqa_peft.core.resolve_auto_init_method`),
            resolved and recorded like ``group_size``; ``"mse"`` keeps, per group, the grid with the lowest
            ``||W0 - W_hat0||_F^2`` among round-to-nearest and grids of several widths centred on the group;
            ``"minmax"`` is plain round-to-nearest over the full range.
        search_grid: resolution of the MSE search (grid widths ``1, 1 - 1/grid, ...`` times each group's span).
        max_shrink: largest fraction of a group's span the search may clip away.
        train_zero_point: also train a zero-point delta ``delta_z`` per group (off in the paper).
        init_weights: ``True`` (default) starts ``delta_s`` (and ``delta_z``) at zero, so a fresh adapter reproduces
            the quantized base exactly. ``False`` starts from a random non-identity ``delta_s`` (for testing).
        target_modules: module names / regex / ``"all-linear"`` (the default when left ``None``: PEQA quantizes every
            linear layer but the output head). ``nn.Linear`` and transformers' ``Conv1D`` are supported.
        exclude_modules: names / regex of modules not to quantize.
        layers_to_transform / layers_pattern: restrict to some layer indices, as in LoRA.
        modules_to_save: extra modules trained in full and saved with the adapter (e.g. a classifier head).
        adopt_checkpoint_grid: ``False`` (default): a layer that is already quantized (a GGUF, GPTQ or
            compressed-tensors checkpoint, or a ``QuantLinear``) must have exactly ``bits``/``group_size``, else it is
            refused. ``True``: such layers keep their own bits and group size (e.g. a GGUF Q4_K_M file mixes 4-bit
            groups of 32 with 6-bit groups of 16), ``bits``/``group_size`` only apply to float layers PEQA quantizes
            itself; the fingerprint records each layer's grid.
        base_fingerprint: filled in when the adapter is created: bits, group size and a hash of ``s0``/``z0`` per
            quantized layer. Loading the adapter onto a base that quantizes differently raises a ``ValueError``.
            (To load anyway, pass ``config=`` with ``base_fingerprint=None`` to ``PeftModel.from_pretrained``.)
    """

    bits: int = field(default=4, metadata={"help": "Weight bit width (2..8)."})
    group_size: Optional[Union[int, str]] = field(
        default="auto",
        metadata={
            "help": "'auto' (group 32 where 32 divides every layer's in_features, else per channel), None for "
            "per-output-channel scales, or input columns per scale group."
        },
    )
    init_method: Literal["auto", "mse", "minmax"] = field(
        default="auto",
        metadata={
            "help": "'auto' ('mse' with groups, 'minmax' per channel), 'mse' (grid search minimising "
            "||W - W_hat||_F^2) or 'minmax' (RTN)."
        },
    )
    search_grid: int = field(default=100, metadata={"help": "Resolution of the MSE grid search."})
    max_shrink: float = field(default=0.8, metadata={"help": "Largest fraction of a range the search may clip."})
    train_zero_point: bool = field(default=False, metadata={"help": "Also train a zero-point delta per group."})
    init_weights: bool = field(
        default=True, metadata={"help": "True: delta_s starts at 0 (identity). False: random non-identity start."}
    )
    adopt_checkpoint_grid: bool = field(
        default=False,
        metadata={"help": "Already quantized layers keep their own bits/group_size instead of having to match."},
    )
    base_fingerprint: Optional[dict] = field(
        default=None, metadata={"help": "Set on creation; checked on load to refuse a differently quantized base."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.PEQA
        validate_quant_settings(self.bits, self.group_size, self.init_method, self.search_grid, self.max_shrink)
        fingerprint = self.base_fingerprint
        if fingerprint is not None and not (
            isinstance(fingerprint, dict) and isinstance(fingerprint.get("layers"), dict)
        ):
            raise ValueError(
                "`base_fingerprint` must be None or a mapping with 'bits', 'group_size' and a 'layers' mapping, got "
                f"{type(fingerprint).__name__}"
            )
        self._check_targets()
