"""Op dispatch of QFT's integer tensor types: one handler per aten op in a per-class table, a refusing fallback.

As in torchao's quantized-training tensors (``implements = classmethod(_implements)``), each subclass of
:class:`IntegerTensor` owns a table ``op -> handler`` filled with the ``@Cls.implements(aten.op, ...)`` decorator;
``__torch_dispatch__`` looks the op up there. A handler is ``handler(func, args, kwargs)``; it may return
:data:`NOT_HANDLED` when it only covers some calls of its op (e.g. in-place scaling by a scalar, not by a tensor).

An op without a handler (or one whose handler declines) raises ``NotImplementedError`` instead of silently computing
on a dequantized float copy, which would defeat QFT's memory savings and hide bugs; inside
:func:`allow_dense_fallback` out-of-place ops run on dequantized copies, with one warning per op.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._pytree import tree_map

NOT_HANDLED = object()  # a handler's answer for a call of its op it does not cover: the fallback decides

Handler = Callable[[Any, tuple, dict], Any]

# Whether allow_dense_fallback() is active, and which (type, op) pairs have warned. A setting the user turns on for a
# block (the context manager), never changed by the library itself.
_DENSE_FALLBACK: dict[str, Any] = {"allowed": False, "warned": set()}


@contextlib.contextmanager
def allow_dense_fallback() -> Iterator[None]:
    """Within this block, ops without a handler run on dequantized copies (warning once per op) instead of raising.

    Every op QFT needs has its own handler; anything else would silently materialize the float weight (or
    gradient), defeating QFT's memory savings and hiding bugs, so by default it raises.
    """
    previous = _DENSE_FALLBACK["allowed"]
    _DENSE_FALLBACK["allowed"] = True
    try:
        yield
    finally:
        _DENSE_FALLBACK["allowed"] = previous


def dense_fallback(cls: type, func: Any, args: tuple, kwargs: dict) -> Any:
    """Refuse ``func`` (no handler), or run it on dequantized copies inside ``allow_dense_fallback()``."""
    if func._schema.is_mutable:
        raise NotImplementedError(f"{cls.__name__} does not support the in-place op {func}; dequantize() it first")
    if not _DENSE_FALLBACK["allowed"]:
        raise NotImplementedError(
            f"{cls.__name__} has no handler for {func}: it would run on a dequantized dense copy. Call .dequantize() "
            "explicitly, or wrap the call in peqa_peft.tuners.qft.allow_dense_fallback()."
        )
    if (cls, func) not in _DENSE_FALLBACK["warned"]:
        _DENSE_FALLBACK["warned"].add((cls, func))
        warnings.warn(f"{cls.__name__}: {func} runs on a dequantized dense copy", RuntimeWarning, stacklevel=3)

    def unwrap(t: Any) -> Any:
        return t.dequantize() if isinstance(t, IntegerTensor) else t

    return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))


class IntegerTensor(torch.Tensor):
    """Base of QFT's wrapper tensor subclasses: a per-class op table and the dispatch through it.

    Subclasses implement ``dequantize()`` (what the dense fallback computes on) and register handlers with
    ``@Subclass.implements(aten.op, ...)``.
    """

    _ops: dict[Any, Handler] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._ops = {}  # each subclass its own table

    @classmethod
    def implements(cls, *ops: Any) -> Callable[[Handler], Handler]:
        """Decorator: register ``handler(func, args, kwargs)`` for each of ``ops`` (aten overloads)."""

        def register(handler: Handler) -> Handler:
            for op in ops:
                if op in cls._ops:
                    raise ValueError(f"{cls.__name__} already has a handler for {op}")
                cls._ops[op] = handler
            return handler

        return register

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = cls._ops.get(func)
        if handler is not None:
            out = handler(func, args, kwargs)
            if out is not NOT_HANDLED:
                return out
        return dense_fallback(cls, func, args, kwargs)

    def dequantize(self, dtype: Any = None) -> torch.Tensor:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError


__all__ = ["NOT_HANDLED", "IntegerTensor", "allow_dense_fallback", "dense_fallback"]
