"""QFT's integer weight and gradient types and their autograd functions (no PEFT, no transformers)."""
