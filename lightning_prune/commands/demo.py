"""``lightning-prune demo``: the ``prune_heal`` recipe on the embedded SmolLM2, with a before/after table.

Not a second implementation: it runs ``fit --config prune_heal`` (iterative Block Influence
removes 7 of 30 layers with magnitude compensation, LoRA heals 8 steps on WikiText-2 valid,
the run directory gets ``metrics.json`` with the dense model, the pruned one and the healed
one); the console summary prints that file's rows as a table.
"""

import json
from pathlib import Path

from lightning_prune.extras import require
from lightning_prune.results import RunDirectory

__all__ = ["demo"]


def demo(
    model: str = "demo",
    num_layers: int | None = None,
    heal_steps: int | None = None,
    output_dir: str = "runs/demo",
    overwrite: bool = True,
) -> dict:
    """Run the prune_heal recipe (prune -> compensate -> LoRA heal -> evaluate) and print the before/after table.

    Args:
        model: 'demo' (SmolLM2-135M) or any other model name.
        num_layers: decoder layers to remove (default: the recipe's 7).
        heal_steps: LoRA optimizer steps (default: the recipe's 8, 16 blocks x 128 tokens each).
        output_dir: the run directory.
        overwrite: replace an earlier demo run in output_dir.
    """
    from lightning_prune.cli import lightning_main
    from lightning_prune.recipes import recipe_path

    require("peft", "demo (LoRA healing)")
    RunDirectory(output_dir, overwrite).check()
    args = ["fit", "--config", str(recipe_path("prune_heal")), "--run_dir", output_dir, "--model.init_args.model", model]
    if num_layers is not None:
        args += ["--prune.num_layers", str(num_layers)]
    if heal_steps is not None:
        args += ["--trainer.max_steps", str(heal_steps), "--trainer.val_check_interval", str(heal_steps)]
    lightning_main(args)
    metrics = json.loads((Path(output_dir) / "metrics.json").read_text(encoding="utf-8"))
    rows = {label: values for label, values in metrics.items() if isinstance(values, dict) and "perplexity" in values}
    return {"run_dir": output_dir, "stages": rows}
