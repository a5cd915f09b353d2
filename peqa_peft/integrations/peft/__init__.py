"""Registration of the PEQA and QFT methods with PEFT, and the patches PEFT needs for them.

``import peft`` imports bitsandbytes whenever it is installed (``peft.helpers`` does, for QLoRA), and that import
logs a warning about a QLoRA CPU kernel it could not fetch from the Hub (offline, ``kernels`` also logs a note about
it). peqa_peft does not use bitsandbytes unless QLoRA/NF4 is asked for (``workflows.models.load_nf4_model``), so
these two messages are held back while *our* import of PEFT runs. The filters are removed right after: bitsandbytes'
later messages, and the same warning when the user imports bitsandbytes or PEFT first, are untouched.
"""

import contextlib
import logging

# What bitsandbytes' import logs about QLoRA's CPU kernel from the Hub: its own fallback warning, and (offline) the
# `kernels` package's note that it skips the publisher check of that kernel. Logger name -> text the message contains.
_BNB_KERNEL_HUB_MESSAGES = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
    "kernels._internals.hf_hub": "kernels-community/quantization-bitsandbytes",
}


class _DropText(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in str(record.msg)


@contextlib.contextmanager
def _without_bnb_kernel_hub_warning():
    filters = [(logging.getLogger(name), _DropText(text)) for name, text in _BNB_KERNEL_HUB_MESSAGES.items()]
    for logger, drop in filters:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger, drop in filters:
            logger.removeFilter(drop)


with _without_bnb_kernel_hub_warning():
    import peft  # noqa: F401
