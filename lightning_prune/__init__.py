"""lightning-prune: make causal LMs smaller, then heal them, with PyTorch Lightning."""

__version__ = "0.1.0"
