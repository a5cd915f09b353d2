"""DDP and FSDP2 support for QFT's integer weights and gradients.

Importing this package registers it with the core (:mod:`peqa_peft.core.qft.hooks`), which calls it through those
hooks instead of importing it.
"""

from ...core.qft import hooks as _hooks
from . import ddp, fsdp

_hooks.register_distributed(ddp.sync_grad_chunk_, fsdp)

__all__ = ["ddp", "fsdp"]
