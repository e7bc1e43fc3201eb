"""shear: structured pruning and distillation for Hugging Face language models."""

__version__ = "0.1.0"
