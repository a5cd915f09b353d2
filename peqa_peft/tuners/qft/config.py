"""Configuration of QFT (quantized full-parameter tuning)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from peft.utils import PeftType

from .._base import QuantTargetsConfig


@dataclass
class QftConfig(QuantTargetsConfig):
    """Configuration of a [`QftModel`]: which weights become trainable integer weights, and how.

    QFT (Li et al., 2023, "QFT: Quantized Full-parameter Tuning of LLMs with Affordable Resources") stores every
    targeted weight as int8 codes with per-output-channel scales plus a sparse set of float outliers (the *hybrid
    feature quantizer*), trains those integers directly with an integer Lion optimizer
    (:class:`peqa_peft.optim.IntLion`) and keeps no floating point master copy.

    Args:
        full_parameter: train every parameter of the model (the default, as in the paper): the targeted linear layers
            *and* the token embeddings and output head (``get_input_embeddings()`` / ``get_output_embeddings()``,
            tied or not) become integer weights, and every remaining float parameter (norm weights, biases,
            non-targeted layers) is trained in its own dtype and saved with the checkpoint. ``False``: only the
            targeted linear layers are tuned (``"all-linear"`` then leaves out the output head) and everything else
            stays frozen.
        outlier_fraction: fraction of each weight's entries (the largest in magnitude) kept in float32 outside the
            int8 grid, in ``[0, 0.5)``; ``0`` disables outliers. Default 1%.
        outlier_refresh_steps: re-select the outlier set every this many optimizer steps (counted per weight by
            ``IntLion``); ``0`` keeps the initial set.
        int8_gradients: hold each weight gradient as int8 with per-row scales (the paper's setting, needed for the
            ~21% model-state memory) instead of in the activation dtype.
        ddp_gradient_sync: how weight gradients are averaged over DDP ranks: ``"fp32"`` (an fp32 all-reduce of each
            gradient chunk before it is quantized: ranks then match one process up to float summation order) or
            ``"int8"`` (each rank sends its chunk as int8 codes + row scales, an all-gather; a quarter of the bytes
            at 2 ranks, half at 4, none saved from ~8 ranks on; the stored gradient's error grows from ~1.0% to
            ~1.3%: ``benchmarks/qft_grad_allreduce.py``). Ranks stay bit-identical either way.
        init_method: how the int8 grid is chosen: ``"minmax"`` (full range of the non-outlier entries) or ``"mse"``
            (the MSE search of :func:`peqa_peft.core.compute_qparams`).
        target_modules: module names / regex / ``"all-linear"`` (the default when ``None``: every linear layer but
            the output head, which ``full_parameter`` adds). ``nn.Linear``, transformers' ``Conv1D`` and
            ``nn.Embedding`` are supported.
        exclude_modules: names / regex of modules to leave untouched.
        layers_to_transform / layers_pattern: restrict to some layer indices, as in LoRA.
        modules_to_save: non-targeted modules (e.g. ``lm_head``, norms) trained in their own float dtype and saved
            with the checkpoint; everything else that is not targeted is frozen.
        tied_embeddings: *recorded by QFT*, not chosen: for a model whose output head shares its weight with the
            input embeddings (``tie_word_embeddings``), ``"integer"`` when both are targets (``full_parameter``
            with the head not excluded): the pair is ONE ``QftWeight`` read by the lookup and the projection, so it
            stays tied through training, saving and reloading; ``"float"`` when the head is not a target (e.g.
            ``exclude_modules=["lm_head"]``, which TRL's SFTTrainer needs): the pair stays one float weight, trained
            as a float parameter under ``full_parameter``. ``None``: the model ties nothing. Saved with the adapter
            config; loading checks that the model and config give the same outcome again.
    """

    full_parameter: bool = field(
        default=True,
        metadata={"help": "Train every parameter: embeddings and head as integer weights too, other floats in float."},
    )
    outlier_fraction: float = field(default=0.01, metadata={"help": "Fraction of entries kept as float outliers."})
    outlier_refresh_steps: int = field(
        default=100, metadata={"help": "Re-select outliers every N optimizer steps (0: never)."}
    )
    int8_gradients: bool = field(default=True, metadata={"help": "Hold weight gradients as int8 (per-row scales)."})
    ddp_gradient_sync: Literal["fp32", "int8"] = field(
        default="fp32", metadata={"help": "Average weight gradients over DDP ranks in 'fp32' or send 'int8' codes."}
    )
    init_method: Literal["minmax", "mse"] = field(
        default="minmax", metadata={"help": "'minmax' or 'mse' choice of the per-channel int8 grid."}
    )
    tied_embeddings: Optional[Literal["integer", "float"]] = field(
        default=None,
        metadata={"help": "Set by QFT: what it made of a tied input/output embedding pair ('integer' or 'float')."},
    )

    @classmethod
    def check_kwargs(cls, **kwargs):
        """A saved config without ``full_parameter`` predates it: it was linear-only, and must load as such."""
        kwargs = super().check_kwargs(**kwargs)
        kwargs.setdefault("full_parameter", False)
        return kwargs

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.QFT
        if not isinstance(self.full_parameter, bool):
            raise TypeError(f"`full_parameter` must be a bool, got {self.full_parameter!r}")
        frac = self.outlier_fraction
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 <= frac < 0.5:
            raise ValueError(f"`outlier_fraction` must be a number in [0, 0.5), got {frac!r}")
        steps = self.outlier_refresh_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"`outlier_refresh_steps` must be an int >= 0 (0: never), got {steps!r}")
        if self.ddp_gradient_sync not in ("fp32", "int8"):
            raise ValueError(f"`ddp_gradient_sync` must be 'fp32' or 'int8', got {self.ddp_gradient_sync!r}")
        if self.tied_embeddings not in (None, "integer", "float"):
            raise ValueError(f"`tied_embeddings` must be None, 'integer' or 'float', got {self.tied_embeddings!r}")
        if self.init_method not in ("minmax", "mse"):
            raise ValueError(f"`init_method` must be 'minmax' or 'mse', got {self.init_method!r}")
        self._check_targets()
