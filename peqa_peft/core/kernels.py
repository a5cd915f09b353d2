"""One-pass kernels on packed codes: unpack + dequantize, the batch-1 decode product, the grouped scale gradient.

The kernels are plain PyTorch functions written so that ``torch.compile`` (Inductor: vectorized C++ on CPU, Triton
on CUDA) fuses each of them into a single pass over the packed bytes. They work on the codes in **plane order**:
for ``bits`` b, the packed stream holds units of ``k`` codes in ``B`` bytes (b = 2: 4 codes per byte, b = 3: 8
codes per 3 bytes, ...); plane ``c`` of a row is code ``c`` of every unit, so a row's ``in_features`` columns come
out ordered ``[c * n + i for c in range(k) for i in range(n)]`` (``n = in_features / k``) instead of ``i * k + c``.
Reading plane ``c`` is a strided load plus a shift and a mask, which vectorizes; writing the codes back interleaved
would not. A matmul does not care about the order of its reduction dimension as long as the input columns are
permuted the same way, which :func:`to_planes` / :func:`from_planes` do on the activation (``T x in``, small next
to the weight). Where a layer does not fit plane order (``in_features`` or the group size not a multiple of ``k``)
the codes are unpacked in natural order (``k = 1``); the rest is the same code.

Three modes, chosen by ``PEQA_KERNELS`` (env var, read at the first kernel call), for a block of code by the context
manager :func:`kernels` (``with kernels("eager"): ...``) or for the process by :func:`set_kernel_mode`; the library
itself changes the mode only when compiling fails (below, with a warning). Compiling raises dynamo's recompile limit
only for the calls that may compile, never in the process-wide config a user's own ``torch.compile`` reads.

- ``"compiled"`` (default): the kernels go through ``torch.compile`` for calls on at least ``COMPILE_MIN_WEIGHTS``
  weights (smaller ones run uncompiled); if compiling fails once (no C++ compiler, an unsupported device) a warning
  is printed and the mode drops to ``"eager"`` for the rest of the process.
- ``"eager"``: the same kernels, uncompiled (several elementwise passes, same results).
- ``"reference"``: no kernels at all; :func:`peqa_peft.core.packed_linear` dequantizes the weight in plain PyTorch
  and lets autograd differentiate ``F.linear``: the slow, obviously-correct path every fast path is tested against.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Optional

import torch

from .packing import unpack_bits

KERNEL_MODES = ("compiled", "eager", "reference")
_ENV_VAR = "PEQA_KERNELS"
# Distinct layer shapes x bit widths x dtypes each compile once (dynamic=False); a Llama has 4 linear shapes, so a
# model with a few bit widths and dtypes stays far below this, and nothing falls back to eager silently. Dynamo's
# limit (8 by default) is raised to this only while one of these kernels may compile -- the first call with a new
# argument signature, see _run -- so the process-wide setting a user's own torch.compile sees never changes.
# (Patching the config around every call would cost ~20-60 us per call, as much as a small layer's decode kernel.)
_RECOMPILE_LIMIT = 256
# Reduction splits tried (largest first) for the per-channel decode product: independent partial sums vectorize.
_DECODE_SPLITS = (16, 8, 4, 2, 1)
_DECODE_MIN_RUN = 64  # ... each at least this long (four 16-float vectors)
_DECODE_LANES = 16  # float32 lanes of the decode product's accumulator (one AVX-512 vector; two AVX2 ones)
# Inductor stores an intermediate once an expression exceeds ~30 ops or 8 reads; unpacking 8 codes from 3 bytes
# crosses that, and the split costs a weight-sized buffer plus a scalar second kernel. One fused loop is faster.
# Below this many weights per call, compiling does not pay: the uncompiled kernels of a small layer cost about as much
# as a compiled call's dispatch (~80 us), while compiling costs seconds per shape and the compiler's resident memory
# (~150 MiB). Layers of real models (hidden >= 1024) are far above it; the bundled demo model is below it.
COMPILE_MIN_WEIGHTS = 1 << 18
_INDUCTOR_OPTIONS = {"realize_opcount_threshold": 1000, "realize_acc_reads_threshold": 64}

_mode: Optional[str] = None


def kernel_mode() -> str:
    """The active mode: ``"compiled"``, ``"eager"`` or ``"reference"`` (see the module docstring)."""
    global _mode
    if _mode is None:
        mode = os.environ.get(_ENV_VAR, "compiled").strip().lower()
        if mode not in KERNEL_MODES:
            raise ValueError(f"{_ENV_VAR}={mode!r}: expected one of {KERNEL_MODES}")
        _mode = mode
    return _mode


def set_kernel_mode(mode: str) -> None:
    """Switch the kernels of this process to ``mode`` (``"compiled"``, ``"eager"`` or ``"reference"``)."""
    global _mode
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernel mode must be one of {KERNEL_MODES}, got {mode!r}")
    _mode = mode


@contextlib.contextmanager
def kernels(mode: str) -> Iterator[None]:
    """Context manager running its body in kernel ``mode``, restoring the previous mode afterwards."""
    previous = kernel_mode()
    set_kernel_mode(mode)
    try:
        yield
    finally:
        set_kernel_mode(previous)


# ---------------------------------------------------------------- plane order


def plane_unit(bits: int) -> tuple[int, int]:
    """``(k, B)``: the packed stream of ``bits``-bit codes is made of units of ``k`` codes in ``B`` whole bytes."""
    if 8 % bits == 0:
        return 8 // bits, 1
    if bits == 6:
        return 4, 3
    return 8, bits


def plane_width(bits: int, in_features: int, group_size: Optional[int]) -> int:
    """``k`` of :func:`plane_unit` if rows and groups are whole units, else 1 (natural order)."""
    k, _ = plane_unit(bits)
    if in_features % k or (group_size is not None and group_size % k):
        return 1
    return k


def to_planes(x: torch.Tensor, k: int) -> torch.Tensor:
    """Permute the last dimension of ``x`` from natural order into plane order (a copy unless ``k == 1``)."""
    if k == 1:
        return x
    *lead, width = x.shape
    return x.reshape(*lead, width // k, k).transpose(-1, -2).reshape(*lead, width)


def from_planes(x: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`to_planes`."""
    if k == 1:
        return x
    *lead, width = x.shape
    return x.reshape(*lead, k, width // k).transpose(-1, -2).reshape(*lead, width)


def _planes(packed: torch.Tensor, bits: int, rows: int, in_features: int, k: int) -> list[torch.Tensor]:
    """The ``k`` code planes of ``rows`` packed rows, each ``(rows, in_features // k)`` of an integer dtype."""
    k_unit, nbytes = plane_unit(bits)
    if k != k_unit:  # natural order: rows or groups are not whole units
        return [unpack_bits(packed, bits, rows * in_features).view(rows, in_features)]
    # [:...] drops the padding of the last unit of the whole tensor (none inside a block of whole rows)
    units = packed[: rows * in_features // k * nbytes].view(rows, in_features // k, nbytes)
    byte = [units[..., i] for i in range(nbytes)]
    mask = (1 << bits) - 1
    planes = []
    for c in range(k):
        # Code c occupies stream bits [bits*c, bits*c + bits) of its unit: one byte, or the end of one and the start
        # of the next. Everything stays uint8 (a left shift past bit 7 drops out), which the compiler vectorizes.
        first, shift = divmod(bits * c, 8)
        code = byte[first] >> shift if shift else byte[first]
        if shift + bits > 8:
            code = code | (byte[first + 1] << (8 - shift))
        planes.append(code & mask if bits < 8 else code)
    return planes


# ---------------------------------------------------------------- the kernels (compiled or eager)


def _dequant_planes(
    packed: torch.Tensor,
    scale: Optional[torch.Tensor],
    zero_point: torch.Tensor,
    bits: int,
    rows: int,
    in_features: int,
    k: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``(q - z)`` (times ``s`` unless ``scale`` is None) as a ``(rows, in_features)`` weight in plane order."""
    groups = zero_point.shape[1]
    width = in_features // k
    z = zero_point.float().view(rows, groups, 1)
    s = None if scale is None else scale.float().view(rows, groups, 1)
    out = []
    for plane in _planes(packed, bits, rows, in_features, k):
        w = plane.view(rows, groups, width // groups).float() - z
        out.append((w if s is None else w * s).to(dtype).view(rows, width))
    return torch.cat(out, 1) if k > 1 else out[0]


def _decode_product(
    xp: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    rows: int,
    in_features: int,
    k: int,
    splits: int,
) -> torch.Tensor:
    """``x @ (s * (q - z))^T`` for one input row (``xp``: ``(in_features,)`` float32, plane order) from the codes."""
    groups = zero_point.shape[1]
    run = in_features // k // groups  # codes of one group (or row) in one plane
    if run % _DECODE_LANES == 0:
        return _decode_lanes(xp, packed, scale, zero_point, bits, rows, in_features, k)
    return _decode_partial_sums(xp, packed, scale, zero_point, bits, rows, in_features, k, splits)


def _decode_lanes(xp, packed, scale, zero_point, bits: int, rows: int, in_features: int, k: int) -> torch.Tensor:
    """The decode product accumulated in ``_DECODE_LANES`` lanes per row, reduced across lanes once per row.

    Every group's run of codes is viewed as ``(run / lanes, lanes)`` and the sum runs over the first axis only, so the
    compiled loop keeps one vector accumulator per row and adds whole vectors to it; a grouped weight's scale
    multiplies each product (one more vector op) instead of a per-group partial sum, which would need a horizontal
    reduction every ``run`` codes (measured on one thread, 5632 x 2048 4-bit: 1.33 -> 1.09 ms per channel,
    1.86 -> 1.40 ms at group 32).
    """
    groups = zero_point.shape[1]
    view = (rows, groups, in_features // k // groups // _DECODE_LANES, _DECODE_LANES)
    z = zero_point.float().view(rows, groups, 1, 1)
    acc = None
    for c, plane in enumerate(_planes(packed, bits, rows, in_features, k)):
        term = xp.view(k, *view[1:])[c] * (plane.view(view).float() - z)
        acc = term if acc is None else acc + term
    if groups > 1:
        acc = acc * scale.float().view(rows, groups, 1, 1)
    out = acc.sum(dim=(1, 2)).sum(-1)
    return out if groups > 1 else out * scale.float().view(rows)


def _decode_partial_sums(xp, packed, scale, zero_point, bits, rows, in_features, k, splits) -> torch.Tensor:
    """The decode product for runs shorter than a vector (e.g. 3-bit at group 32): scales multiply partial sums."""
    groups = zero_point.shape[1]
    width = in_features // k
    # Per channel: independent partial sums over `splits` chunks of each row; grouped: one partial sum per group,
    # scaled once. Either way the compiler gets several independent vector accumulators.
    chunks = groups if groups > 1 else splits
    z = zero_point.float().view(rows, -1, 1)
    acc = None
    for c, plane in enumerate(_planes(packed, bits, rows, in_features, k)):
        term = xp.view(k, chunks, width // chunks)[c] * (plane.view(rows, chunks, width // chunks).float() - z)
        acc = term if acc is None else acc + term
    partial = acc.sum(-1)  # (rows, chunks)
    if groups > 1:
        return (partial * scale.float()).sum(-1)
    return partial.sum(-1) * scale.float().view(rows)


def _group_dot(
    dw: torch.Tensor, packed: torch.Tensor, zero_point: torch.Tensor, bits: int, rows: int, in_features: int, k: int
) -> torch.Tensor:
    """``sum_{j in g} dw[o, j] * (q[o, j] - z[o, g])`` for a block of rows; ``dw`` is ``(rows, in)`` in plane order."""
    groups = zero_point.shape[1]
    width = in_features // k
    z = zero_point.float().view(rows, groups, 1)
    dwp = dw.float().view(rows, k, groups, width // groups)
    acc = None
    for c, plane in enumerate(_planes(packed, bits, rows, in_features, k)):
        term = dwp[:, c] * (plane.view(rows, groups, width // groups).float() - z)
        acc = term if acc is None else acc + term
    return acc.sum(-1)


_compiled: dict[str, Callable] = {}
# (kernel name, argument signature) of the calls that have run compiled: their graph exists, no compile can follow.
_compiled_signatures: set[tuple] = set()


def _signature(args: tuple) -> tuple:
    """What dynamo's guards of a ``dynamic=False`` compile look at: grad mode, each tensor's shape, strides, dtype,
    device and requires_grad, and every other argument's value. A call with a new signature may compile."""
    return (torch.is_grad_enabled(),) + tuple(
        (a.shape, a.stride(), a.dtype, a.device, a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args
    )


def compiles(numel: int) -> bool:
    """Whether a kernel call on ``numel`` weights goes through ``torch.compile`` (compiled mode, large enough)."""
    return kernel_mode() == "compiled" and numel >= COMPILE_MIN_WEIGHTS


def _run(name: str, fn: Callable, *args, eager: Optional[Callable] = None, dynamic: bool = False, numel: int = 0):
    """``fn(*args)``, through ``torch.compile`` in compiled mode (falling back to eager once if compiling fails).

    ``eager`` replaces ``fn`` outside compiled mode (None: return None there), for kernels whose uncompiled form
    would materialize what the compiled one streams (e.g. every clipping candidate of the MSE search at once).
    ``numel``: the weights the call covers, for :func:`compiles`.
    """
    if torch.compiler.is_compiling():
        # Traced by the caller's own torch.compile: inline the plain function into its graph (compiling a function
        # of ours from inside a trace fails on fake tensors, and that would drop this process to eager kernels).
        return (eager or fn)(*args)
    if compiles(numel):
        compiled = _compiled.get(name)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=dynamic, fullgraph=True, options=_INDUCTOR_OPTIONS)
            _compiled[name] = compiled
        try:
            signature = (name, _signature(args))
            if signature in _compiled_signatures:
                return compiled(*args)
            # A new signature may compile: raise dynamo's per-function recompile limit for this call only.
            dynamo_config = torch._dynamo.config
            with dynamo_config.patch(recompile_limit=max(dynamo_config.recompile_limit, _RECOMPILE_LIMIT)):
                out = compiled(*args)
            _compiled_signatures.add(signature)
            return out
        except Exception as exc:  # no C++ compiler, an unsupported device or dtype: same math, uncompiled
            warnings.warn(
                f"peqa_peft: torch.compile of the packed-weight kernel {name!r} failed "
                f"({type(exc).__name__}: {str(exc)[:200]}); using the uncompiled kernels from now on.",
                RuntimeWarning,
                stacklevel=3,
            )
            set_kernel_mode("eager")
    return None if eager is None else eager(*args)


def dequant_planes(packed, scale, zero_point, bits, rows, in_features, k, dtype) -> torch.Tensor:
    """Fused unpack + dequantize into plane order: ``(q - z)``, or ``s * (q - z)`` when ``scale`` is given."""
    args = (packed, scale, zero_point, bits, rows, in_features, k, dtype)
    return _run("dequant", _dequant_planes, *args, eager=_dequant_planes, numel=rows * in_features)


def decode_product(x, packed, scale, zero_point, bits, rows, in_features, k) -> torch.Tensor:
    """Fused single-row product ``x @ W_hat^T`` (float32, shape ``(rows,)``) without materializing ``W_hat``."""
    width = in_features // k
    splits = next((r for r in _DECODE_SPLITS if width % r == 0 and width // r >= _DECODE_MIN_RUN), 1)
    # The permutation of x is a gather: done outside the kernel, so that the kernel only streams contiguous data.
    xp = to_planes(x.float(), k).contiguous()
    args = (xp, packed, scale, zero_point, bits, rows, in_features, k, splits)
    return _run("decode", _decode_product, *args, eager=_decode_product, numel=rows * in_features)


def group_dot(dw, packed, zero_point, bits, rows, in_features, k) -> torch.Tensor:
    """Fused per-group reduction of a weight-gradient block against ``q - z`` (float32, ``(rows, n_groups)``)."""
    args = (dw, packed, zero_point, bits, rows, in_features, k)
    return _run("group_dot", _group_dot, *args, eager=_group_dot, numel=rows * in_features)


def run_compiled(name: str, fn: Callable, *args):
    """``torch.compile(fn, dynamic=True)(*args)``, or None outside compiled mode or when compiling fails.

    The caller decides with :func:`compiles` whether its problem is large enough.
    """
    return _run(name, fn, *args, dynamic=True, numel=COMPILE_MIN_WEIGHTS)


__all__ = [
    "COMPILE_MIN_WEIGHTS",
    "KERNEL_MODES",
    "compiles",
    "decode_product",
    "dequant_planes",
    "from_planes",
    "group_dot",
    "kernel_mode",
    "kernels",
    "plane_unit",
    "plane_width",
    "run_compiled",
    "set_kernel_mode",
    "to_planes",
]
