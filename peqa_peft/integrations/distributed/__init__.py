"""DDP and FSDP2 support for QFT's integer weights and gradients."""
