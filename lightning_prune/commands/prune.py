"""``lightning-prune prune``: remove decoder layers, save the model, report perplexity before/after."""

from lightning_prune.commands.common import EvaluationData, load_checked_model, parse_indices, run_record, split_names
from lightning_prune.model.anatomy import Anatomy
from lightning_prune.model.surgery import remove_layers, validate_layer_indices
from lightning_prune.results import RunDirectory

__all__ = ["prune"]


def prune(
    model: str = "demo",
    layers: str = "",
    data: str = "wikitext2",
    seq_len: int = 128,
    num_samples: int = 64,
    batch_size: int = 8,
    dtype: str = "float32",
    device: str = "cpu",
    output_dir: str = "runs/prune",
    overwrite: bool = False,
) -> dict:
    """Remove the given decoder layers and save the smaller model.

    Args:
        model: 'demo', a Hugging Face Hub id, a local model directory or a .gguf file.
        layers: comma-separated indices of the layers to remove, e.g. 12,13.
        data: comma-separated evaluation sources (wikitext2, c4, text/jsonl paths).
        seq_len: tokens per evaluation block.
        num_samples: evaluation blocks per source.
        batch_size: blocks per forward pass.
        dtype: float32, bfloat16 or float16.
        device: e.g. cpu, cuda.
        output_dir: run directory for model/, decisions.json and metrics.json.
        overwrite: replace results already in output_dir.
    """
    settings = dict(locals())
    run = RunDirectory(output_dir, overwrite)
    run.check()
    indices = parse_indices(layers)
    lm, tokenizer = load_checked_model(model, dtype=dtype, device=device, seq_len=seq_len)
    removed = validate_layer_indices(indices, Anatomy(lm).num_layers)
    evaluation = EvaluationData(tokenizer, split_names(data), seq_len=seq_len, num_samples=num_samples)
    settings["data_files"] = evaluation.files
    before = evaluation.evaluate(lm, batch_size=batch_size)
    kept = remove_layers(lm, removed)
    after = evaluation.evaluate(lm, batch_size=batch_size)
    decisions = {"removed_layers": removed, "kept_layers": kept}
    run.save_model(lm, tokenizer)
    run.write_json("decisions.json", decisions)
    run.write_config(settings)
    record = run_record(settings, before=before, after=after)
    run.write_json("metrics.json", record)
    return {**record, "decisions": decisions}
