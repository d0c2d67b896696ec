"""``lightning-prune evaluate``: perplexity of a model on text data."""

from lightning_prune.commands.common import EvaluationData, load_checked_model, run_record, split_names
from lightning_prune.results import RunDirectory

__all__ = ["evaluate"]


def evaluate(
    model: str = "demo",
    data: str = "wikitext2",
    seq_len: int = 128,
    num_samples: int = 64,
    batch_size: int = 8,
    dtype: str = "float32",
    device: str = "cpu",
    output_dir: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Measure perplexity on the first ``num_samples`` blocks of each data source.

    Args:
        model: 'demo', a Hugging Face Hub id, a local model directory or a .gguf file.
        data: comma-separated sources: wikitext2, c4, or paths to text/jsonl files (key = file stem).
        seq_len: tokens per block.
        num_samples: blocks per source.
        batch_size: blocks per forward pass.
        dtype: float32, bfloat16 or float16.
        device: e.g. cpu, cuda, cuda:1.
        output_dir: where to write metrics.json (optional).
        overwrite: replace results already in output_dir.
    """
    settings = dict(locals())
    run = RunDirectory(output_dir, overwrite) if output_dir else None
    if run:
        run.check()
    lm, tokenizer = load_checked_model(model, dtype=dtype, device=device, seq_len=seq_len)
    evaluation = EvaluationData(tokenizer, split_names(data), seq_len=seq_len, num_samples=num_samples)
    settings["data_files"] = evaluation.files
    record = run_record(settings, **evaluation.evaluate(lm, batch_size=batch_size))
    if run:
        run.write_json("metrics.json", record)
    return record
