"""CLI subcommands: plain functions whose signatures are the command-line options."""

from lightning_prune.commands.apply import apply
from lightning_prune.commands.chat import chat
from lightning_prune.commands.demo import demo
from lightning_prune.commands.evaluate import evaluate
from lightning_prune.commands.generate import generate
from lightning_prune.commands.merge import merge
from lightning_prune.commands.prune import prune
from lightning_prune.commands.relevance import relevance
from lightning_prune.commands.score import score
from lightning_prune.commands.sparsify import sparsify

COMMANDS = {
    "evaluate": evaluate,
    "prune": prune,
    "merge": merge,
    "sparsify": sparsify,
    "apply": apply,
    "demo": demo,
    "score": score,
    "relevance": relevance,
    "generate": generate,
    "chat": chat,
}

__all__ = ["COMMANDS"]
