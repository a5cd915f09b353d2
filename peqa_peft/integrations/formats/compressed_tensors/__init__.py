"""compressed-tensors (pack-quantized) checkpoints."""
