"""Ranges of numeric options, by option name: one table for every command and recipe section.

A command's ``--batch_size`` and a recipe's ``data.init_args.batch_size`` obey the same rule,
so the check runs on the parsed options before any work and names the option as given.
"""

from lightning_prune.errors import InputError

__all__ = ["RANGES", "check_numbers"]

# option name -> (lowest allowed value, whether the lowest value itself is allowed, what to say)
RANGES = {
    "batch_size": (1, True, "blocks per forward pass"),
    "seq_len": (2, True, "tokens per block (a block predicts tokens 2..T)"),
    "eval_samples": (1, True, "evaluation blocks"),
    "calibration_samples": (1, True, "calibration blocks or items"),
    "num_samples": (1, True, "blocks"),
    "num_train_samples": (1, True, "training blocks (unset: all)"),
    "num_val_samples": (1, True, "validation blocks"),
    "block_size": (1, True, "layers per block"),
    "num_layers": (1, True, "layers"),
    "heal_steps": (1, True, "optimizer steps"),
    "learning_rate": (0, False, "the peak learning rate"),
    "weight_decay": (0, True, "the AdamW weight decay"),
    "warmup_steps": (0, True, "warm-up optimizer steps"),
}


def check_numbers(options: dict, prefix: str = "--") -> None:
    """Refuse the first option of ``options`` (name -> value) that is a number outside its range in :data:`RANGES`."""
    for name, value in options.items():
        rule = RANGES.get(name)
        if rule is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        lowest, inclusive, meaning = rule
        if value < lowest or (value == lowest and not inclusive):
            bound = f">= {lowest}" if inclusive else f"> {lowest}"
            raise InputError(f"{prefix}{name} {value} is out of range: {meaning} must be {bound}")
