"""Human summaries of a command's result: a short table on the console (``--json`` prints the full result).

One row per model state (before / after a stage, or the evaluated model) with its layers,
parameters, weight size, perplexity per source, task accuracy and time.
"""

from collections.abc import Callable, Sequence

__all__ = ["markdown_table", "model_rows", "summarize"]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table whose columns are padded to their widest cell (readable as plain text too)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]

    def line(cells):
        return "| " + " | ".join(str(cell).ljust(width) for cell, width in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (width + 2) for width in widths) + "|", *map(line, rows)])


def _accuracy(values: dict) -> dict[str, float]:
    """``{task: accuracy}`` of an lm-eval result entry (acc_norm where the task has it)."""
    tasks = values.get("tasks") or {}
    return {name: scores.get("acc_norm", scores.get("acc")) for name, scores in tasks.items() if isinstance(scores, dict)}


def model_rows(states: dict[str, dict], seconds: dict[str, float] | None = None) -> str:
    """Table of model states ``{label: {num_layers, num_parameters, num_bytes, perplexity?, tasks?}}``."""
    seconds = seconds or {}
    sources = list(dict.fromkeys(key for values in states.values() for key in values.get("perplexity", {})))
    tasks = list(dict.fromkeys(key for values in states.values() for key in _accuracy(values)))
    header = ["stage", "layers", "parameters", "weights MB", *(f"PPL {s}" for s in sources), *(f"acc {t}" for t in tasks)]
    if seconds:
        header.append("seconds")
    rows = []
    for label, values in states.items():
        perplexity, accuracy = values.get("perplexity", {}), _accuracy(values)
        row = [label, str(values["num_layers"]), f"{values['num_parameters']:,}", f"{values.get('num_bytes', 0) / 1e6:.1f}"]
        row += [f"{perplexity[s]:.2f}" if s in perplexity else "" for s in sources]
        row += [f"{accuracy[t]:.3f}" if accuracy.get(t) is not None else "" for t in tasks]
        if seconds:
            row.append(f"{seconds[label]:.1f}" if label in seconds else "")
        rows.append(row)
    return markdown_table(header, rows)


def _evaluate(result: dict) -> str:
    return model_rows({"model": result})


def _staged(result: dict) -> str:
    if result.get("dry_run"):
        return f"dry run: plan written to {result['plan']}; no model saved, nothing evaluated"
    stage = result["settings"]["stage"]["name"]
    table = model_rows({"dense": result["before"], stage: result["after"]}, {stage: result["stage_seconds"]})
    lines = [table, *result.get("summary", [])]
    return "\n".join([*lines, f"saved to {result['settings']['output_dir']}/model"])


def _apply(result: dict) -> str:
    table = model_rows({"original": result["before"], "applied": result["after"]})
    return "\n".join([table, *result["decisions"], f"saved to {result['output_dir']}/model"])


def _score(result: dict) -> str:
    ranked = sorted((score, layer) for layer, score in enumerate(result["scores"]) if score is not None)
    rows = [[str(layer), f"{score:.4g}"] for score, layer in ranked[:5]]
    title = f"{result['metric']} on {result['data']}: the 5 least important layers (higher = more important)"
    return f"{title}\n{markdown_table(['layer', 'score'], rows)}"


def _extreme_layer(values: list, pick: Callable) -> str:
    scored = [(score, layer) for layer, score in enumerate(values or []) if score is not None]
    return str(pick(scored)[1]) if scored else ""


def _relevance(result: dict) -> str:
    rows = [
        [
            name,
            str(task["items"]),
            f"{task['acc_norm']:.3f}",
            f"{task['chance']:.3f}",
            _extreme_layer(task.get("accuracy_relevance"), max),
            _extreme_layer(task.get("accuracy_relevance"), min),
        ]
        for name, task in result["tasks"].items()
    ]
    return markdown_table(["task", "items", "acc_norm", "chance", "most relevant layer", "least relevant layer"], rows)


def _demo(result: dict) -> str:
    rows = result["stages"]
    seconds = {label: values["seconds"] for label, values in rows.items() if "seconds" in values}
    return f"{model_rows(rows, seconds)}\nhealed model saved to {result['run_dir']}/model"


SUMMARIES: dict[str, Callable[[dict], str]] = {
    "evaluate": _evaluate,
    "prune": _staged,
    "merge": _staged,
    "sparsify": _staged,
    "apply": _apply,
    "score": _score,
    "relevance": _relevance,
    "demo": _demo,
}


def summarize(command: str, result: dict) -> str:
    """The console summary of ``command``'s result (commands without one get nothing)."""
    summary = SUMMARIES.get(command)
    return summary(result) if summary else ""
