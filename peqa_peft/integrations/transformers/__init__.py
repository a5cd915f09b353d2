"""transformers integration: quantize-on-load through an ``HfQuantizer``."""
