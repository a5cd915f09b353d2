"""transformers integration: quantize-on-load through an ``HfQuantizer``, and transformers' ``Conv1D`` (GPT-2's
transposed linear layer) registered with the core as a linear layer."""

from transformers.pytorch_utils import Conv1D

from ...core.linear import register_transposed_linear

register_transposed_linear(Conv1D)
