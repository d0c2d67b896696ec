"""Callbacks that run core steps (pruning, merging, sparsity, evaluation) at the right Lightning hook."""
