"""``lightning-prune demo``: the end-to-end recipe on the embedded SmolLM2, with a summary table."""

from lightning_prune.commands.prune import prune

__all__ = ["demo", "summary_table"]


def summary_table(metrics: dict) -> str:
    """A markdown before/after table from a prune run's metrics."""
    before, after = metrics["before"], metrics["after"]
    rows = ["| stage | layers | parameters | " + " | ".join(f"PPL {key}" for key in before["perplexity"]) + " |"]
    rows.append("|---" * (3 + len(before["perplexity"])) + "|")
    for stage, values in (("dense", before), ("pruned", after)):
        scores = " | ".join(f"{value:.2f}" for value in values["perplexity"].values())
        rows.append(f"| {stage} | {values['num_layers']} | {values['num_parameters']:,} | {scores} |")
    return "\n".join(rows)


def demo(
    model: str = "demo",
    layers: str = "24,25",
    seq_len: int = 128,
    num_samples: int = 32,
    output_dir: str = "runs/demo",
    overwrite: bool = True,
) -> dict:
    """Remove layers from the demo model, save it, and print perplexity before/after.

    Args:
        model: 'demo' (SmolLM2-135M) or any other model name.
        layers: comma-separated indices of the layers to remove.
        seq_len: tokens per evaluation block.
        num_samples: WikiText-2 test blocks evaluated.
        output_dir: run directory.
        overwrite: replace an earlier demo run in output_dir.
    """
    metrics = prune(
        model=model, layers=layers, data="wikitext2", seq_len=seq_len, num_samples=num_samples,
        output_dir=output_dir, overwrite=overwrite,
    )
    print(summary_table(metrics))
    print(f"saved to {output_dir}/model (loads with transformers.AutoModelForCausalLM.from_pretrained)")
    return {"output_dir": output_dir, "removed_layers": metrics["decisions"]["removed_layers"]}
