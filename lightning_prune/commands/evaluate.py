"""``lightning-prune evaluate``: perplexity of a model on text data, optional multiple-choice accuracy (lm-eval)."""

from lightning_prune.commands.common import EvaluationData, load_checked_model, run_record, split_names
from lightning_prune.evaluation.harness import check_task_options, evaluate_tasks, resolve_tasks
from lightning_prune.onload import finish_onload
from lightning_prune.results import RunDirectory

__all__ = ["evaluate"]


def evaluate(
    model: str = "demo",
    eval_data: str = "wikitext2",
    seq_len: int = 128,
    eval_samples: int = 64,
    batch_size: int = 8,
    dtype: str = "auto",
    device: str = "auto",
    output_dir: str | None = None,
    overwrite: bool = False,
    tasks: str | None = None,
    task_dir: str | None = None,
    limit: int | None = None,
    num_fewshot: int = 0,
    onload: str = "none",
    offload_dir: str | None = None,
    max_device_memory: str | None = None,
) -> dict:
    """Measure perplexity on the first eval_samples blocks of each data source, and task accuracy.

    Args:
        model: 'demo', a Hugging Face Hub id, a local model directory or a .gguf file.
        eval_data: comma-separated sources: wikitext2, c4, or paths to text/jsonl files (key = file stem).
        seq_len: tokens per block.
        eval_samples: blocks per source.
        batch_size: blocks per forward pass.
        dtype: auto (bfloat16 on a CUDA device that supports it, else float32), float32, bfloat16 or float16.
        device: auto (CUDA if available, else CPU), cpu, cuda, cuda:N or mps.
        output_dir: where to write metrics.json (optional).
        overwrite: replace results already in output_dir.
        tasks: comma-separated multiple-choice tasks for lm-eval (arc_easy, piqa, boolq, or stems of files in task_dir).
        task_dir: directory of <task>.jsonl files with query/choices/gold per line.
        limit: evaluate the first limit items of each task (default: all).
        num_fewshot: in-context examples per task question.
        onload: none (the whole model on the device) or layer (decoder layers stay in host memory, or in
            offload_dir, and run on the device one at a time: device memory ~ one layer + embeddings and head).
        offload_dir: with onload layer, keep the layers in memory-mapped safetensors files under this
            directory instead of host memory (a local safetensors checkpoint is read from its own files).
        max_device_memory: refuse to start when what goes on the device does not fit (e.g. 24GiB; default: unchecked).
    """
    settings = dict(locals())
    run = RunDirectory(output_dir, overwrite) if output_dir else None
    if run:
        run.check()
    task_names = split_names(tasks or "")
    if task_names:
        check_task_options(limit, num_fewshot)
        resolve_tasks(task_names, task_dir)
    sources = split_names(eval_data)
    lm, tokenizer = load_checked_model(
        model,
        dtype=dtype,
        device=device,
        seq_len=seq_len,
        data=sources,
        onload=onload,
        offload_dir=offload_dir,
        max_device_memory=max_device_memory,
    )
    try:
        evaluation = EvaluationData(tokenizer, sources, seq_len=seq_len, num_samples=eval_samples)
        settings["data_files"] = evaluation.files
        values = evaluation.evaluate(lm, batch_size=batch_size)
        if task_names:
            accuracy = evaluate_tasks(
                lm, tokenizer, task_names, task_dir=task_dir, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size
            )
            values["tasks"], settings["harness"] = accuracy["tasks"], accuracy["settings"]
    finally:
        finish_onload(lm)
    record = run_record(settings, **values)
    if run:
        run.write_json("metrics.json", record)
    return record
