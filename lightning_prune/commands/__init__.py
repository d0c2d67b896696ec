"""CLI subcommands: plain functions whose signatures are the command-line options."""

from lightning_prune.commands.demo import demo
from lightning_prune.commands.evaluate import evaluate
from lightning_prune.commands.prune import prune

COMMANDS = {
    "evaluate": evaluate,
    "prune": prune,
    "demo": demo,
}

__all__ = ["COMMANDS"]
