"""The Hugging Face model card (``model/README.md``) of a saved model.

YAML front matter (``base_model``, ``library_name``, ``tags``, ``pipeline_tag``) for the Hub,
then a body: the base model, every decision (its ``summary()`` and ``to_json()``), the data,
the measured metrics and the command or recipe that reproduces the model.
"""

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lightning_prune.results import package_versions
from lightning_prune.stages import Decision

__all__ = ["CardInfo", "model_card", "stage_card", "hub_base_model", "command_line", "DEMO_BASE_MODEL"]

DEMO_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
KIND_TAGS = {"prune": "pruned", "merge": "merged", "sparsify": "sparse"}
DENSE_NOTE = "Loads with plain `transformers`: `AutoModelForCausalLM.from_pretrained(...)`."
COMPRESSED_NOTE = (
    "The decoder projections are stored in compressed-tensors' sparse bitmask format (`quantization_config.sparsity_config`"
    " in config.json). transformers 5 does not decompress it (it would leave those weights uninitialised); load it with"
    " `lightning_prune.sparsity.compressed.load_compressed(path)` or a runtime that reads compressed-tensors sparsity."
)
_RUN_ONLY = ("stage", "data_files", "calibration_file", "overwrite", "push_to_hub")
_SIZES = (("num_layers", "decoder layers"), ("num_parameters", "parameters"), ("num_bytes", "weight bytes"))


def hub_base_model(model: str | None) -> str | None:
    """The Hub id a model name stands for (``demo`` -> SmolLM2), or ``None`` for a local directory or file."""
    if model == "demo":
        return DEMO_BASE_MODEL
    if not model or model.startswith(("/", ".", "~")) or model.endswith(".gguf") or model.count("/") != 1 or "\\" in model:
        return None
    if Path(model).exists():  # a local directory such as models/x
        return None
    return model


def command_line(command: str, options: dict) -> str:
    """``lightning-prune COMMAND --option value ...`` for the options that are set (``None`` left out)."""
    parts = [f"lightning-prune {command}"]
    for name, value in options.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(item) for item in value)
        text = str(value).lower() if isinstance(value, bool) else str(value)
        parts.append(f"--{name} {shlex.quote(text)}")
    return " \\\n  ".join(parts)


@dataclass
class CardInfo:
    """What a model card reports.

    Args:
        model: the model name the run started from ('demo', a Hub id, a local path).
        decisions: the decisions applied, in order.
        measurements: label (e.g. ``before``, ``after``) -> ``{"perplexity": {source: value}, "num_layers": ...}``.
        data: what was used (e.g. ``{"calibration": "wikitext2, 64 blocks of 128 tokens"}``).
        reproduce: the command (or recipe) that rebuilds the model, shown as a code block.
        reproduce_language: the code block's language (``bash`` or ``yaml``).
        tags: extra Hub tags (e.g. ``compressed-tensors``).
        note: how to load the model (under the title).
    """

    model: str | None
    decisions: list[Decision]
    measurements: dict[str, dict] = field(default_factory=dict)
    data: dict[str, str] = field(default_factory=dict)
    reproduce: str = ""
    reproduce_language: str = "bash"
    tags: list[str] = field(default_factory=list)
    note: str = DENSE_NOTE


def _front_matter(info: CardInfo) -> str:
    tags = ["lightning-prune", *dict.fromkeys(KIND_TAGS.get(d.kind, d.kind) for d in info.decisions), *info.tags]
    meta = {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": tags}
    base = hub_base_model(info.model)
    if base:
        meta = {"base_model": base, **meta}
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _metrics_table(measurements: dict[str, dict]) -> list[str]:
    labels = list(measurements)
    sources = list(dict.fromkeys(s for values in measurements.values() for s in values.get("perplexity", {})))
    rows = [f"| | {' | '.join(labels)} |", f"|---|{'---|' * len(labels)}"]
    for source in sources:
        cells = [
            f"{values['perplexity'][source]:.3f}" if source in values.get("perplexity", {}) else "" for values in measurements.values()
        ]
        rows.append(f"| perplexity ({source}) | {' | '.join(cells)} |")
    tasks = list(dict.fromkeys(t for values in measurements.values() for t in values.get("tasks", {})))
    for task in tasks:
        cells = [f"{values['tasks'][task]['acc']:.4f}" if task in values.get("tasks", {}) else "" for values in measurements.values()]
        rows.append(f"| accuracy ({task}) | {' | '.join(cells)} |")
    for key, title in _SIZES:
        cells = [f"{values[key]:,}" if key in values else "" for values in measurements.values()]
        if any(cells):
            rows.append(f"| {title} | {' | '.join(cells)} |")
    return rows


def model_card(info: CardInfo) -> str:
    """The model card text (front matter + Markdown body)."""
    base = hub_base_model(info.model)
    lines = [
        _front_matter(info),
        f"# {base.split('/')[-1] if base else 'Model'} (lightning-prune)",
        "",
        f"Base model: {f'[{base}](https://huggingface.co/{base})' if base else f'`{info.model}`'}.",
        "Produced with lightning-prune.",
        info.note,
        "",
        "## Decisions",
        "",
    ]
    lines += [f"{i}. {d.summary()}" for i, d in enumerate(info.decisions, 1)] or ["None (the base model's weights)."]
    for decision in info.decisions:
        body = json.dumps(decision.to_json(), indent=1, default=str)
        lines += [
            "",
            f"<details><summary>{decision.kind} decision (decisions.json entry)</summary>",
            "",
            "```json",
            body,
            "```",
            "</details>",
        ]
    if info.data:
        lines += ["", "## Data", ""] + [f"- {name}: {value}" for name, value in info.data.items()]
    if info.measurements:
        lines += ["", "## Metrics", ""] + _metrics_table(info.measurements)
    if info.reproduce:
        lines += ["", "## Reproduce", "", f"```{info.reproduce_language}", info.reproduce.rstrip(), "```"]
    versions = ", ".join(f"{name} {version}" for name, version in package_versions().items())
    lines += ["", f"Versions: {versions}.", ""]
    return "\n".join(lines)


def compressed(decisions: list[Decision]) -> bool:
    """Whether a decision exports compressed-tensors weights (sparsify with ``export_format: compressed``)."""
    return any(d.to_json().get("settings", {}).get("export_format") == "compressed" for d in decisions)


def stage_card(stage, decision: Decision, model: str, measurements: dict, data: dict, settings: dict) -> str:
    """The card of a one-shot stage command (``prune``, ``merge``, ``sparsify``): its command line reproduces it."""
    options = {key: value for key, value in settings.items() if key not in _RUN_ONLY}
    options.update(settings.get("stage", {}))
    options.pop("name", None)
    packed = compressed([decision])
    info = CardInfo(
        model=model,
        decisions=[decision],
        measurements=measurements,
        data=data,
        reproduce=command_line(stage.name, options),
        tags=["compressed-tensors"] if packed else [],
        note=COMPRESSED_NOTE if packed else DENSE_NOTE,
    )
    return model_card(info)


def recipe_card(source: str | None, decisions: list[Decision], results: dict, data: dict, config_text: str | None, sizes: dict) -> str:
    """The card of a recipe run (``StageCallback``): its ``config.yaml`` reproduces it with ``lightning-prune fit``."""
    packed = compressed(decisions)
    reproduce = f"# lightning-prune fit --config config.yaml\n{config_text}" if config_text else ""
    info = CardInfo(
        model=source,
        decisions=decisions,
        measurements=results or {"saved": sizes},
        data=data,
        reproduce=reproduce,
        reproduce_language="yaml",
        tags=["compressed-tensors"] if packed else [],
        note=COMPRESSED_NOTE if packed else DENSE_NOTE,
    )
    return model_card(info)
