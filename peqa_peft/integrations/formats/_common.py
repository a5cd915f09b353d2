"""What every export format shares: collecting a merged PEQA model's integer layers and float tensors, the
tokenizer, and writing an output directory atomically.

A PEQA model (a ``PeftModel`` with PEQA adapters, or the ``merge_and_unload()`` result whose targeted layers are
:class:`~peqa_peft.core.QuantLinear`) is a standard asymmetric integer weight-only model once the scale deltas are
added to ``s0``: every quantized layer is ``W = s * (q - z)`` with integer codes ``q`` and one scale ``s`` and
zero-point ``z`` per output channel or per group of ``group_size`` inputs. :func:`collect` reads exactly that, without
modifying the model and without materialising any float weight, so every writer stores the codes as they are.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn

from ...core import QuantLinear, unpack_bits


@dataclass
class QuantWeight:
    """One merged PEQA layer: ``weight = scale * (codes - zero)`` (per output channel or per group of inputs)."""

    name: str  # the module's name in the transformers model, e.g. "model.layers.0.self_attn.q_proj"
    bits: int
    group_size: Optional[int]  # None: one scale per output channel
    packed: torch.Tensor  # QuantLinear.qweight (peqa_peft's dense bit packing)
    scale: torch.Tensor  # float32 (out_features, n_groups), s0 + merged deltas
    zero: torch.Tensor  # (out_features, n_groups): uint8, or float32 after a trained zero-point delta
    bias: Optional[torch.Tensor]
    out_features: int
    in_features: int

    @property
    def codes(self) -> torch.Tensor:
        """The integer codes as ``uint8`` ``(out_features, in_features)``."""
        return unpack_bits(self.packed, self.bits, self.out_features * self.in_features).view(
            self.out_features, self.in_features
        )

    @property
    def effective_group_size(self) -> int:
        """Inputs sharing one scale: ``group_size``, or all ``in_features`` for per-channel layers."""
        return self.group_size or self.in_features

    def integer_zero(self, fmt: str) -> torch.Tensor:
        """The zero-point as integers in ``[0, 2^bits)``; a fractional (trained) zero-point is refused."""
        zero = self.zero
        if zero.is_floating_point():
            if not torch.equal(zero, zero.round()):
                raise ValueError(
                    f"layer '{self.name}' has a fractional zero-point (PEQA trained with train_zero_point=True); "
                    f"{fmt} stores integer zero-points, so it cannot be exported exactly. Export it with "
                    "format='gguf' (Q4_1/Q5_1 store the offset -s*z as a float) or train without train_zero_point."
                )
            zero = zero.round()
        if zero.min() < 0 or zero.max() > 2**self.bits - 1:
            raise ValueError(
                f"layer '{self.name}': zero-point outside [0, {2**self.bits - 1}] for {self.bits} bits; {fmt} "
                "cannot store it"
            )
        return zero.to(torch.int16)


@dataclass
class ExportModel:
    """A merged PEQA model as the writers see it (all tensors on CPU, nothing modified in the source model)."""

    config: Any  # transformers PretrainedConfig
    generation_config: Any
    layers: dict[str, QuantWeight]  # by module name
    tensors: dict[str, torch.Tensor]  # every other persistent tensor, by state-dict name (tied copies dropped)
    float_linears: list[str] = field(default_factory=list)  # nn.Linear modules left unquantized (e.g. lm_head)
    architecture: str = ""  # the transformers model class, e.g. "LlamaForCausalLM"

    @property
    def bits(self) -> int:
        return next(iter(self.layers.values())).bits

    @property
    def group_size(self) -> Optional[int]:
        return next(iter(self.layers.values())).group_size


def _quant_weight(name: str, base: QuantLinear, scale: torch.Tensor, zero: torch.Tensor) -> QuantWeight:
    cpu = torch.device("cpu")
    return QuantWeight(
        name=name,
        bits=base.bits,
        group_size=base.group_size,
        packed=base.qweight.detach().to(cpu),
        scale=scale.detach().to(cpu, torch.float32),
        zero=zero.detach().to(cpu),
        bias=None if base.bias is None else base.bias.detach().to(cpu),
        out_features=base.out_features,
        in_features=base.in_features,
    )


def _walk(module: nn.Module, prefix: str, out: ExportModel, seen: dict[int, str]) -> None:
    if isinstance(module, BaseTunerLayer) and callable(getattr(module, "merged_qparams", None)):
        # a PEQA layer (tuners.peqa.layer.PeqaLayer; not imported here: formats sit below the tuners)
        scale, zero = module.merged_qparams()
        out.layers[prefix] = _quant_weight(prefix, module.get_base_layer(), scale, zero)
        return
    if isinstance(module, QuantLinear):
        out.layers[prefix] = _quant_weight(prefix, module, module.scale, module.zero_point)
        return
    if isinstance(module, ModulesToSaveWrapper):
        active = module.active_adapters[0] if module.active_adapters else None
        inner = module.modules_to_save[active] if active in module.modules_to_save else module.original_module
        _walk(inner, prefix, out, seen)
        return
    if isinstance(module, BaseTunerLayer):
        raise TypeError(
            f"module '{prefix}' is a {type(module).__name__} adapter layer; only PEQA models can be exported "
            "(merge other adapters with merge_and_unload() first)"
        )
    if isinstance(module, nn.Linear):
        out.float_linears.append(prefix)
    dot = prefix + "." if prefix else ""
    local = list(module.named_parameters(recurse=False)) + [
        (n, b) for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set
    ]
    for name, tensor in local:
        if tensor is None:
            continue
        key = id(tensor)
        if key in seen:  # tied weights (e.g. lm_head = embed_tokens): stored once, tied again on load
            continue
        seen[key] = dot + name
        out.tensors[dot + name] = tensor.detach().to("cpu")
    for child_name, child in module.named_children():
        _walk(child, dot + child_name, out, seen)


def base_transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model under a ``PeftModel`` (or ``model`` itself)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def collect(model: nn.Module) -> ExportModel:
    """Read a PEQA model (``PeftModel`` with active PEQA adapters, or a merged model) for export."""
    hf_model = base_transformers_model(model)
    if getattr(hf_model, "config", None) is None:
        raise TypeError(f"expected a transformers model or a PeftModel around one, got {type(model).__name__}")
    result = ExportModel(
        config=hf_model.config,
        generation_config=getattr(hf_model, "generation_config", None),
        layers={},
        tensors={},
        architecture=type(hf_model).__name__,
    )
    _walk(hf_model, "", result, {})
    if not result.layers:
        raise ValueError(
            "the model has no PEQA-quantized layer to export (expected PEQA adapters or a merge_and_unload() result)"
        )
    settings = {(q.bits, q.group_size) for q in result.layers.values()}
    if len(settings) > 1:
        raise ValueError(f"quantized layers use different (bits, group_size) settings {sorted(settings, key=str)}")
    return result


def model_source(model: nn.Module) -> Optional[str]:
    """Where the base model was loaded from (to find its tokenizer), if known."""
    hf_model = base_transformers_model(model)
    path = getattr(hf_model.config, "_name_or_path", None) or getattr(hf_model, "name_or_path", None)
    if not path and isinstance(model, PeftModel):
        path = next(iter(model.peft_config.values())).base_model_name_or_path
    return path or None


def load_tokenizer(model: nn.Module, tokenizer: Any = None):
    """``tokenizer`` as given (object or path), else the tokenizer saved beside the base model; error if none."""
    from transformers import AutoTokenizer, PreTrainedTokenizerBase

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    source = tokenizer if tokenizer is not None else model_source(model)
    if source is None:
        raise ValueError(
            "no tokenizer: pass tokenizer=... (a tokenizer or its path); the model does not say where "
            "it was loaded from"
        )
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"no tokenizer found at '{source}' ({err}); pass tokenizer=... explicitly") from err


class OutputExistsError(FileExistsError, ValueError):
    """The output directory exists and is not empty (and overwriting was not asked for)."""


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing non-empty ``output_dir`` unless ``overwrite`` (before any work is done)."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"output path '{path}' exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"output directory '{path}' exists and is not empty; pass overwrite=True (--overwrite)"
        )
    return path


@contextlib.contextmanager
def atomic_output_dir(output_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``output_dir``; on success it replaces ``output_dir`` by a rename.

    Any exception removes the temporary directory, so a failed export leaves no (half-written) output and an
    existing ``output_dir`` untouched.
    """
    path = check_output_dir(output_dir, overwrite).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should look like any directory the user makes
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.rename(path, old)
        os.rename(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
