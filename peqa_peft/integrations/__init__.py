"""Glue to other libraries: PEFT registration, transformers' quantizer, checkpoint formats, the Hub, DDP/FSDP."""
