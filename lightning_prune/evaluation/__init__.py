"""Evaluation: perplexity, downstream tasks, speed."""

from lightning_prune.evaluation.perplexity import perplexity

__all__ = ["perplexity"]
