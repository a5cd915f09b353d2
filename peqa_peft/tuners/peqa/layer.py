"""PEQA tuner layers: scale-delta adapters over a packed ``QuantLinear`` base."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ...core import QuantLinear
from .config import PeqaConfig


class PeqaLayer(BaseTunerLayer):
    """Mixin holding the per-adapter scale deltas ``peqa_scale[name]`` (and optional ``peqa_zero_point[name]``).

    The base layer is a :class:`~peqa_peft.core.QuantLinear` shared by all adapters: the integer codes, ``s0`` and
    ``z0`` are frozen buffers there; the adapters only hold deltas of shape ``(out_features, n_groups)``.
    """

    adapter_layer_names = ("peqa_scale", "peqa_zero_point")
    other_param_names = ()

    def __init__(self, base_layer: QuantLinear, **kwargs: Any) -> None:
        if not isinstance(base_layer, QuantLinear):
            raise TypeError(f"PEQA layers wrap a QuantLinear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.peqa_scale = nn.ParameterDict({})
        self.peqa_zero_point = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters = []
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features

    def update_layer(self, adapter_name: str, config: PeqaConfig, **kwargs: Any) -> None:
        """Create the deltas of a new adapter; its quantization settings must match the shared base."""
        base = self.get_base_layer()
        if not config.adopt_checkpoint_grid and (config.bits, config.group_size) != (base.bits, base.group_size):
            raise ValueError(
                f"adapter '{adapter_name}' asks for bits={config.bits}, group_size={config.group_size}, but this "
                f"layer is already quantized with bits={base.bits}, group_size={base.group_size}; all PEQA adapters "
                "of a model share one quantized base."
            )
        shape = base.scale.shape
        # PEFT's convention: adapter weights start in the replaced layer's dtype; `autocast_adapter_dtype=True`
        # (the default) then casts fp16/bf16 ones to float32, `False` keeps them as they are.
        dtype = getattr(base, "source_dtype", None) or torch.float32
        delta_scale = torch.zeros(shape, dtype=dtype, device=base.scale.device)
        if not config.init_weights:
            # A deterministic-size, non-identity start (PEFT's convention for init_weights=False).
            delta_scale = (base.scale.float() * 0.1 * torch.randn(shape, device=base.scale.device)).to(dtype)
        self.peqa_scale[adapter_name] = nn.Parameter(delta_scale)
        if config.train_zero_point:
            delta_zero = torch.zeros(shape, dtype=dtype, device=base.scale.device)
            if not config.init_weights:
                delta_zero = 0.5 * torch.randn_like(delta_zero)
            self.peqa_zero_point[adapter_name] = nn.Parameter(delta_zero)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _deltas(self, adapter_names: list[str]) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Sum of the scale and zero-point deltas of ``adapter_names`` (``None`` where there is none)."""
        scales = [self.peqa_scale[a] for a in adapter_names if a in self.peqa_scale]
        zeros = [self.peqa_zero_point[a] for a in adapter_names if a in self.peqa_zero_point]
        return (sum(scales) if scales else None), (sum(zeros) if zeros else None)

    def merged_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The scale and zero-point this layer quantizes with now: ``s0 + Δs`` and ``z0 (+ Δz)`` of the active
        adapters, or the base's own when they are merged or disabled (what ``merge`` would write; the export writers
        read it). Differentiable with respect to the deltas."""
        base = self.get_base_layer()
        if self.merged or self.disable_adapters:
            return base.scale, base.zero_point
        delta_scale, delta_zero = self._deltas(self.active_adapters)
        scale = base.scale if delta_scale is None else base.scale + delta_scale.to(base.scale.dtype)
        zero = base.zero_point if delta_zero is None else base.zero_point.float() + delta_zero.float()
        return scale, zero

    def base_fingerprint(self) -> str:
        """Fingerprint of the quantized base as it was before any adapter was merged into it."""
        base = self.get_base_layer()
        merged_scale, _ = self._deltas(self.merged_adapters)
        scale = base.scale if merged_scale is None else base.scale - merged_scale.detach().to(base.scale.dtype)
        return base.fingerprint(scale)


class Linear(nn.Module, PeqaLayer):
    """PEQA adapter on a packed linear layer (from ``nn.Linear`` or transformers ``Conv1D``)."""

    def __init__(self, base_layer: QuantLinear, adapter_name: str, config: PeqaConfig, **kwargs: Any) -> None:
        super().__init__()
        PeqaLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the deltas of the active (or given) adapters into the base ``scale``/``zero_point``.

        The merged layer stays packed: merging a PEQA adapter only changes ``s0`` (and ``z0``).
        With ``safe_merge=True`` the new values are checked for NaN/inf before anything is written.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        if safe_merge:
            problem = self.merge_problem(adapter_names)
            if problem:
                raise ValueError(problem)
        base = self.get_base_layer()
        for name in adapter_names:
            delta_scale, delta_zero = self._deltas([name])
            if delta_scale is None:
                continue
            base.scale.add_(delta_scale.detach().to(base.scale.dtype))
            if delta_zero is not None:
                # a trained zero-point is fractional: the uint8 buffer becomes float32 for good
                base.zero_point = base.zero_point.float() + delta_zero.detach().float()
            self.merged_adapters.append(name)

    def merge_problem(self, adapter_names: list[str]) -> Optional[str]:
        """Why merging ``adapter_names`` (in order) would give non-finite scales or zero-points, else ``None``."""
        base = self.get_base_layer()
        scale, zero = base.scale.detach().clone(), base.zero_point.detach().float()
        for name in adapter_names:
            delta_scale, delta_zero = self._deltas([name])
            if delta_scale is not None:
                scale = scale + delta_scale.detach().to(scale.dtype)
            if delta_zero is not None:
                zero = zero + delta_zero.detach().float()
            if not (torch.isfinite(scale).all() and torch.isfinite(zero).all()):
                return f"NaNs detected in the merged scales. The adapter {name} seems to be broken"
        return None

    def unmerge(self) -> None:
        """Subtract merged deltas from the base again (exact up to float rounding of the scales)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            delta_scale, delta_zero = self._deltas([name])
            if delta_scale is not None:
                base.scale.sub_(delta_scale.detach().to(base.scale.dtype))
            if delta_zero is not None:
                base.zero_point.sub_(delta_zero.detach().to(base.zero_point.dtype))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(x)
        if self.merged:
            return base(x)
        # merged_qparams (s0 + Δs, a few small ops) only runs when the base needs it: not while the int4 path's
        # folded scales are current for these sources.
        return base(x, qparams_sources=self._qparams_sources(base), qparams=self.merged_qparams)

    def qparams_sources(self) -> tuple[torch.Tensor, ...]:
        """The tensors :meth:`merged_qparams` is computed from now (``s0``, ``z0``, the active adapters' deltas).

        The base layer's int4 path keeps its folded scales while none of them is replaced or modified in place.
        """
        return self._qparams_sources(self.get_base_layer())

    def _qparams_sources(self, base) -> tuple[torch.Tensor, ...]:
        scales, zeros = self.peqa_scale, self.peqa_zero_point  # one module lookup each (called every forward)
        active = [a for a in self.active_adapters if a in scales]
        deltas = [scales[a] for a in active] + [zeros[a] for a in active if a in zeros]
        return (base.scale, base.zero_point, *deltas)

    def __repr__(self) -> str:
        return "peqa." + super().__repr__()
