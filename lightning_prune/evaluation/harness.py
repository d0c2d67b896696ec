"""Multiple-choice accuracy with lm-eval-harness on a live model and local jsonl tasks.

Paper 002 App. C.1 / 004: the model scores the log-likelihood of ``query + " " + choice`` for
every choice; ``acc`` takes the arg-max of the summed log-likelihood, ``acc_norm`` of the
log-likelihood divided by the choice's length in characters (lm-eval's definition). Tasks are
jsonl files with ``query`` (str), ``choices`` (list of str) and ``gold`` (index) per line -
the bundled ``arc_easy``, ``piqa``, ``boolq``, or a user's own files in ``task_dir`` (file
stem = task name). For each task a YAML config is written to a temporary directory and found
through ``TaskManager(include_path=...)``; datasets load with the ``json`` builder, with the
Hub switched off, so nothing touches the network.

Any other name lm-eval's own registry knows (``hellaswag``, ``mmlu``, …) runs as lm-eval
defines it, with its own metrics; its dataset comes from the Hub or, offline, from the local
``datasets`` cache. Bundled and ``task_dir`` names take precedence over registry names.
"""

import functools
import os
import tempfile
from pathlib import Path

import yaml
from torch import nn

from lightning_prune.data.hub import closest_name
from lightning_prune.data.tasks import TASK_NAMES, load_task, task_file
from lightning_prune.errors import InputError, MissingInputError
from lightning_prune.extras import require

__all__ = ["PROMPT_FORMAT", "resolve_tasks", "check_task_options", "task_config", "evaluate_tasks"]

PROMPT_FORMAT = {
    "doc_to_text": "{{query}}",
    "doc_to_choice": "{{choices}}",
    "doc_to_target": "{{gold}}",
    "target_delimiter": " ",
    "fewshot_delimiter": "\n\n",
}
METRICS = ("acc", "acc_norm")


@functools.cache
def registry_tasks() -> frozenset[str]:
    """Names of the tasks in lm-eval's own registry (indexing it takes a few seconds)."""
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager().all_tasks)


def resolve_tasks(names: list[str], task_dir: str | None = None) -> dict[str, Path | None]:
    """Task name -> jsonl file (``task_dir/<name>.jsonl`` if given, else a bundled task), or ``None`` for an lm-eval registry task.

    Every file is read once here, so a missing field fails before any model work; names that
    are neither local nor in lm-eval's registry are refused.
    """
    if not names:
        raise InputError("--tasks names no task; pass e.g. arc_easy,piqa")
    require("lm_eval", "--tasks (lm-eval accuracy)")
    directory = Path(task_dir).expanduser() if task_dir else None
    if directory is not None and not directory.is_dir():
        raise MissingInputError(f"--task_dir {task_dir!r} is not a directory of <task>.jsonl files")
    files, registry = {}, None
    for name in names:
        if directory is not None and (directory / f"{name}.jsonl").is_file():
            files[name] = (directory / f"{name}.jsonl").resolve()
        elif name in TASK_NAMES:
            files[name] = task_file(name).resolve()
        else:
            registry = registry_tasks() if registry is None else registry
            if name not in registry:
                where = f"no {task_dir}/{name}.jsonl" if directory else "no --task_dir holding it"
                raise InputError(
                    f"task {name!r} is not bundled ({', '.join(TASK_NAMES)}), not in lm-eval's registry{closest_name(name, sorted(registry))}, and there is {where}"
                )
            files[name] = None
            continue
        load_task(str(files[name]))
    return files


def check_task_options(limit: int | None, num_fewshot: int) -> None:
    """``limit`` must be positive (or None) and ``num_fewshot`` non-negative."""
    if limit is not None and limit <= 0:
        raise InputError(f"limit {limit} must be a positive number of items (or unset for all)")
    if num_fewshot < 0:
        raise InputError(f"num_fewshot {num_fewshot} must be >= 0")


def task_config(name: str, path: Path) -> dict:
    """lm-eval task config for one local jsonl file (all items form the test split)."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
        "fewshot_split": "test",
        "output_type": "multiple_choice",
        **PROMPT_FORMAT,
        "metric_list": [{"metric": metric, "aggregation": "mean", "higher_is_better": True} for metric in METRICS],
    }


def _offline() -> None:
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"


def evaluate_tasks(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    *,
    task_dir: str | None = None,
    limit: int | None = None,
    num_fewshot: int = 0,
    batch_size: int = 8,
    seed: int = 1234,
) -> dict:
    """Accuracy of ``model`` on local multiple-choice tasks with lm-eval (``HFLM`` on the live model).

    Args:
        model: a Hugging Face causal LM (any device; evaluated in eval mode).
        tokenizer: its tokenizer.
        tasks: task names (bundled, or stems of jsonl files in ``task_dir``).
        task_dir: directory of ``<task>.jsonl`` files in the query/choices/gold format.
        limit: evaluate the first ``limit`` items of each task (``None``: all).
        num_fewshot: in-context examples per question, drawn from the same file (seeded).
        batch_size: requests per forward pass.
        seed: lm-eval's few-shot sampling seed.

    Returns:
        ``{"tasks": {name: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "num_items"}},
        "settings": {...every setting, prompt format, files...}}``.
    """
    check_task_options(limit, num_fewshot)
    files = resolve_tasks(tasks, task_dir)
    local = {name: path for name, path in files.items() if path is not None}
    if len(local) == len(files):
        _offline()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    was_training = model.training
    model.eval()
    with tempfile.TemporaryDirectory(prefix="lightning-prune-tasks-") as directory:
        for name, path in local.items():
            Path(directory, f"{name}.yaml").write_text(yaml.safe_dump(task_config(name, path)), encoding="utf-8")
        manager = TaskManager(include_path=directory, include_defaults=len(local) < len(files))
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        output = _run_harness(
            lm_eval,
            model=lm,
            tasks=list(files),
            task_manager=manager,
            num_fewshot=num_fewshot,
            limit=limit,
            log_samples=False,
            bootstrap_iters=1000,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    model.train(was_training)
    return {
        "tasks": {name: _task_scores(output, name) for name in files},
        "settings": _settings(files, limit, num_fewshot, batch_size, seed),
    }


def _run_harness(lm_eval, **options) -> dict:
    """``lm_eval.simple_evaluate``; a registry task whose dataset cannot be fetched is one line."""
    try:
        return lm_eval.simple_evaluate(**options)
    except (ConnectionError, OSError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(
            f"lm-eval could not load the data of --tasks {','.join(options['tasks'])}: {first}; "
            "registry tasks need the Hub or their dataset in the local datasets cache"
        ) from error


def _task_scores(output: dict, name: str) -> dict:
    values = output["results"][name]
    scores = {}
    for metric in METRICS:
        if f"{metric},none" not in values:
            continue
        scores[metric] = float(values[f"{metric},none"])
        stderr = values.get(f"{metric}_stderr,none")
        scores[f"{metric}_stderr"] = float(stderr) if isinstance(stderr, (int, float)) else None
    samples = output.get("n-samples", {}).get(name)
    scores["num_items"] = int(samples["effective"]) if samples else None
    return scores


def _settings(files: dict[str, Path], limit: int | None, num_fewshot: int, batch_size: int, seed: int) -> dict:
    from importlib import metadata

    return {
        "harness": f"lm_eval {metadata.version('lm_eval')}",
        "task_files": {name: str(path) if path else f"lm-eval registry task {name}" for name, path in files.items()},
        "prompt_format": PROMPT_FORMAT,
        "metrics": {
            "acc": "arg-max of summed choice log-likelihood",
            "acc_norm": "arg-max of log-likelihood / choice length in characters",
        },
        "num_fewshot": num_fewshot,
        "limit": limit,
        "batch_size": batch_size,
        "seed": seed,
    }
