"""Ranges of numeric options, by option name: one table for every command and recipe section.

A command's ``--batch_size`` and a recipe's ``data.init_args.batch_size`` obey the same rule,
so the check runs on the parsed options before any work and names the option as given.
"""

from lightning_prune.errors import InputError

__all__ = ["RANGES", "check_numbers"]

# option name -> (lowest value, whether the lowest value is allowed, highest allowed value or None, what it counts)
RANGES = {
    "batch_size": (1, True, None, "blocks per forward pass"),
    "seq_len": (2, True, None, "tokens per block; a block predicts tokens 2..T"),
    "eval_samples": (1, True, None, "evaluation blocks"),
    "calibration_samples": (1, True, None, "calibration blocks or items"),
    "num_samples": (1, True, None, "blocks"),
    "num_train_samples": (1, True, None, "training blocks; unset: all"),
    "num_val_samples": (1, True, None, "validation blocks"),
    "block_size": (1, True, None, "layers per block"),
    "heal_steps": (1, True, None, "optimizer steps"),
    "learning_rate": (0, False, None, "the peak learning rate"),
    "weight_decay": (0, True, None, "the AdamW weight decay"),
    "warmup_steps": (0, True, None, "warm-up optimizer steps"),
    "max_new_tokens": (1, True, None, "tokens to generate"),
    "temperature": (0, True, None, "0: greedy decoding"),
    "top_p": (0, False, 1, "the nucleus probability mass"),
}


def _bound(lowest, inclusive: bool, highest) -> str:
    if highest is not None:
        return f"in {'[' if inclusive else '('}{lowest}, {highest}]"
    return f">= {lowest}" if inclusive else f"> {lowest}"


def check_numbers(options: dict, prefix: str = "--") -> None:
    """Refuse the first option of ``options`` (name -> value) that is a number outside its range in :data:`RANGES`."""
    for name, value in options.items():
        rule = RANGES.get(name)
        if rule is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        lowest, inclusive, highest, meaning = rule
        if value < lowest or (value == lowest and not inclusive) or (highest is not None and value > highest):
            raise InputError(f"{prefix}{name} must be {_bound(lowest, inclusive, highest)}, got {value} ({meaning})")
