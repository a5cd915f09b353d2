"""Readers and writers of quantized checkpoint formats (one sub-package per format)."""
