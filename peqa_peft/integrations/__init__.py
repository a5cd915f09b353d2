"""Glue between peqa_peft's core and the outside world: PEFT registration, transformers' quantizer, checkpoint
formats, the Hub, DDP/FSDP, output paths.

- :mod:`.validation`: the checks every quantized tensor set passes before it is used (saved adapters and adopted
  checkpoints alike);
- :mod:`.outputs`: output-path checks and atomic directory replacement shared by saves, exports and training.
"""
