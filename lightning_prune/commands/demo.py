"""``lightning-prune demo``: prune -> compensate -> heal (LoRA) -> evaluate on the embedded SmolLM2.

A CPU-sized version of the ``configs/prune_heal.yaml`` recipe: iterative Block Influence
selects the layers, magnitude compensation rescales the residual stream, a short LoRA run on
WikiText-2 valid heals the pruned model, and WikiText-2 test perplexity is printed for the
dense, pruned and healed model in one table.
"""

import time
from pathlib import Path

from lightning_prune.commands.common import EvaluationData
from lightning_prune.commands.prune import prune
from lightning_prune.results import RunDirectory, model_summary

__all__ = ["demo", "heal", "summary_table"]


def summary_table(rows: dict[str, dict]) -> str:
    """A markdown table: one row per stage with layers, parameters and perplexity per source."""
    sources = list(next(iter(rows.values()))["perplexity"])
    lines = ["| stage | layers | parameters | " + " | ".join(f"PPL {key}" for key in sources) + " |"]
    lines.append("|---" * (3 + len(sources)) + "|")
    for stage, values in rows.items():
        scores = " | ".join(f"{values['perplexity'][key]:.2f}" for key in sources)
        lines.append(f"| {stage} | {values['num_layers']} | {values['num_parameters']:,} | {scores} |")
    return "\n".join(lines)


def heal(model_dir: str, *, output_dir: Path, steps: int, seq_len: int, batch_size: int, learning_rate: float, seed: int,
         quantize: str | None = None):
    """A short LoRA (or QLoRA) healing fit (paper 002 adapters, CPU-sized budget); saves model/ and adapter/.

    Returns the fitted :class:`~lightning_prune.modules.healing.HealingModule` (imported here: peft and
    bitsandbytes load only when healing runs, not for every CLI command).
    """
    import lightning as L

    from lightning_prune.data.datamodule import TextDataModule
    from lightning_prune.modules.healing import HealingModule

    L.seed_everything(seed, verbose=False)
    module = HealingModule(model=model_dir, learning_rate=learning_rate, warmup_steps=max(1, steps // 10),
                           quantize=quantize, save_dir=str(output_dir))
    data = TextDataModule(tokenizer=model_dir, seq_len=seq_len, num_train_samples=steps * batch_size, batch_size=batch_size, seed=seed)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, default_root_dir=str(output_dir))
    trainer.fit(module, datamodule=data)
    return module


def demo(
    model: str = "demo",
    num_layers: int = 7,
    calibration_samples: int = 8,
    heal_steps: int = 8,
    heal_batch_size: int = 4,
    learning_rate: float = 1e-3,
    seq_len: int = 128,
    num_samples: int = 16,
    seed: int = 0,
    output_dir: str = "runs/demo",
    overwrite: bool = True,
) -> dict:
    """Prune layers of the demo model (iterative BI + magnitude compensation), heal with LoRA, print before/after.

    Args:
        model: 'demo' (SmolLM2-135M) or any other model name.
        num_layers: decoder layers to remove.
        calibration_samples: WikiText-2 valid blocks for scoring and compensation.
        heal_steps: LoRA optimizer steps (tokens seen = heal_steps x heal_batch_size x seq_len).
        heal_batch_size: WikiText-2 valid blocks per healing step.
        learning_rate: peak LoRA learning rate (higher than paper 002's 3e-4 because the budget is tiny).
        seq_len: tokens per block.
        num_samples: WikiText-2 test blocks evaluated.
        seed: seed of calibration, training order and adapter initialisation.
        output_dir: run directory (prune/ and heal/ inside).
        overwrite: replace an earlier demo run in output_dir.
    """
    run = RunDirectory(output_dir, overwrite)
    run.check()
    pruned = prune(
        model=model, num_layers=num_layers, metric="block_influence", selection="iterative", compensation="magnitude",
        calibration_samples=calibration_samples, seed=seed, seq_len=seq_len, num_samples=num_samples,
        output_dir=str(Path(output_dir) / "prune"), overwrite=overwrite,
    )
    start = time.perf_counter()
    module = heal(str(Path(output_dir) / "prune" / "model"), output_dir=Path(output_dir) / "heal", steps=heal_steps,
                  seq_len=seq_len, batch_size=heal_batch_size, learning_rate=learning_rate, seed=seed)
    seconds = time.perf_counter() - start
    healed = module.export_model()
    evaluation = EvaluationData(module.tokenizer, ["wikitext2"], seq_len=seq_len, num_samples=num_samples)
    rows = {"dense": pruned["before"], "pruned + compensated": pruned["after"],
            "healed (LoRA)": {**evaluation.evaluate(healed, batch_size=8), **model_summary(healed)}}
    table = summary_table(rows)
    print(table)
    summary = {
        "removed_layers": pruned["decisions"]["removed_layers"], "stages": rows,
        "healing": {"steps": heal_steps, "tokens_seen": heal_steps * heal_batch_size * seq_len, "seconds": round(seconds, 1)},
    }
    run.write_json("metrics.json", summary)
    print(f"healed model saved to {output_dir}/heal/model (loads with transformers.AutoModelForCausalLM.from_pretrained)")
    return summary
