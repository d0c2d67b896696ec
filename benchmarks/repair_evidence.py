"""Evidence for repair (issue 13): which repair steps bring a 30 -> 23 layer SmolLM2 close to a dense model healed alike.

Every run is a shipped recipe run in-process through ``lightning_prune.cli.main`` (what a user of
``lightning-prune fit --config ...`` gets), read back from its ``run_dir/metrics.json``. Removal
(iterative Block Influence) and CoMe merging, 7 of 30 layers each, with every repair step:

- no repair (removal without compensation; the merge), magnitude compensation (removal);
- layerwise distillation with ``mse_norm`` and with ``kl_raw``: removal, ``distill_gap`` (the kept
  layer after each gap trains on the calibration blocks, ``steps`` matched to the budget); CoMe,
  ``come_sp`` (the merged layers train on the healing data);
- healing of the whole model with the same budget: LM-loss LoRA, teacher-KL LoRA and teacher-KL
  full-parameter training (``HEALS``: the settings chosen on held-out text by
  ``benchmarks/heal_selection.py``);
- the full pipeline ``prune_gap_heal`` (removal; compensation -> gap distillation -> teacher-KL
  heal) and its CoMe twin (merge -> gap distillation of the merged layer and the one after it ->
  teacher-KL heal);
- the dense model healed with the same budget and the LM loss (the teacher KL of the dense model to
  itself is zero), one control per kind of heal: LoRA rows divide by the LoRA control, full-parameter
  rows by the full-parameter control, the other rows by the full-parameter control (the stronger).

Every healed row trains on the same WikiText-2-valid tokens (``--steps`` optimizer steps x 16
blocks x 128 tokens) and every row is measured on the same blocks of WikiText-2 test (in domain)
and of the bundled C4 test half (out of domain, used for nothing else). ``--seeds 1,2`` reruns the
headline runs (both pipelines and their control) with ``--seed_everything`` and ``--data.init_args.seed``
set to each seed (other training and calibration draws, so other pruning picks too). ``--task_runs``
measures lm-eval accuracy of those runs' saved models (and the dense model) with
``lightning-prune evaluate``. The JSON (``benchmarks/results/repair_evidence.json``, one entry per
budget) and the ``repair-evidence`` section of ``docs/results/healing.md`` are written after every
run, so a run cut short keeps its rows (a run already in the JSON is not run again).

Usage: OMP_NUM_THREADS=2 python benchmarks/repair_evidence.py --steps 8 [--runs control_full,bi_pipeline,...]
    [--seeds 1,2] [--task_runs control_full,bi_pipeline --tasks arc_easy,piqa,boolq --task_limit 300]
"""

import argparse
import importlib.util
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

from report import ROOT, update_section

OUTPUT = ROOT / "benchmarks" / "results" / "repair_evidence.json"
SEQ_LEN, BATCH, ACCUMULATE = 128, 4, 4  # 16 blocks x 128 tokens per optimizer step
# The heals compared (HealingModule settings on top of configs/prune_distill_heal.yaml), chosen on
# held-out text by benchmarks/heal_selection.py (benchmarks/results/heal_selection.json).
HEALS = {
    "lora": ["--model.init_args.learning_rate", "1e-3"],
    "full": ["--model.init_args.finetune", "full", "--model.init_args.learning_rate", "1e-4"],
}
PIPELINE_HEAL = "full"  # the heal of the full pipeline rows
LM = ["--model.init_args.distill", "null"]
ONE_STEP = ["--trainer.max_steps", "1", "--trainer.val_check_interval", "1"]  # runs read only for a stage entry
MERGE = ["--stages", "[merge]"]
COME_GAP = ["--stages", "[merge, distill_gap]", "--distill_gap.layers_before", "1", "--distill_gap.layers_after", "1"]


def gap_steps(steps: int) -> list[str]:
    """distill_gap budget matched to the heal: the same tokens per window (2 calibration blocks per step)."""
    return ["--distill_gap.steps", str(steps * BATCH * ACCUMULATE // 2)]


def runs_for(steps: int) -> dict[str, list[str]]:
    """Run key -> recipe flags (besides the shared budget and evaluation flags)."""
    heal = {kind: ["--config", "prune_distill_heal", *flags] for kind, flags in HEALS.items()}
    return {
        "control_lora": [*heal["lora"], "--stages", "[]", *LM],
        "control_full": [*heal["full"], "--stages", "[]", *LM],
        "bi_none": ["--config", "prune_distill_heal", "--prune.compensation", "none", *ONE_STEP],
        "bi_gap_mse": ["--config", "prune_gap_heal", *gap_steps(steps), *ONE_STEP],
        "bi_gap_kl": ["--config", "prune_gap_heal", *gap_steps(steps), "--distill_gap.loss", "kl_raw", *ONE_STEP],
        "bi_lm_lora": [*heal["lora"], *LM],
        "bi_kd_lora": heal["lora"],
        "bi_kd_full": heal["full"],
        "bi_pipeline": ["--config", "prune_gap_heal", *HEALS[PIPELINE_HEAL]],
        "come_mse": ["--config", "come_sp", "--model.init_args.loss", "mse_norm", "--model.init_args.learning_rate", "1e-3"],
        "come_kl": ["--config", "come_sp", "--model.init_args.loss", "kl_raw", "--model.init_args.learning_rate", "1e-3"],
        "come_lm_lora": [*heal["lora"], *MERGE, *LM],
        "come_kd_lora": [*heal["lora"], *MERGE],
        "come_kd_full": [*heal["full"], *MERGE],
        "come_pipeline": ["--config", "prune_gap_heal", *COME_GAP, *HEALS[PIPELINE_HEAL]],
    }


HEADLINE = ("bi_pipeline", "come_pipeline", f"control_{PIPELINE_HEAL}")  # the runs repeated with --seeds (control last)
# (row, run, metrics.json entry, control run, what the row is)
ROWS = [
    ("1", "control_full", "dense", None, "dense, no healing"),
    ("2", "control_lora", "after training", "control_lora", "dense + LM-loss LoRA (control of the LoRA rows)"),
    ("3", "control_full", "after training", "control_full", "dense + LM-loss full-parameter training (control of the other rows)"),
    ("R0", "bi_none", "after prune", "control_full", "removal (BI iterative), {n} layers, no repair"),
    ("R1", "bi_gap_mse", "after prune", "control_full", "+ magnitude compensation"),
    ("R2", "bi_gap_mse", "after distill_gap", "control_full", "+ compensation + layerwise distillation (`distill_gap`, `mse_norm`)"),
    ("R2k", "bi_gap_kl", "after distill_gap", "control_full", "+ compensation + layerwise distillation (`distill_gap`, `kl_raw`)"),
    ("R3", "bi_lm_lora", "after training", "control_lora", "+ compensation + LM-loss LoRA"),
    ("R4", "bi_kd_lora", "after training", "control_lora", "+ compensation + teacher-KL LoRA"),
    ("R5", "bi_kd_full", "after training", "control_full", "+ compensation + teacher-KL full-parameter"),
    ("R6a", "bi_pipeline", "after distill_gap", "control_full", "pipeline, before healing: compensation + `distill_gap` (recipe default)"),
    ("R6", "bi_pipeline", "after training", f"control_{PIPELINE_HEAL}", "**full pipeline** (`prune_gap_heal`): + teacher-KL heal"),
    ("M0", "come_mse", "after merge", "control_full", "CoMe merge, {n} layers merged away, no repair"),
    ("M2", "come_mse", "after training", "control_full", "CoMe + layerwise distillation (`come_sp`, `mse_norm`, lr 1e-3)"),
    ("M2k", "come_kl", "after training", "control_full", "CoMe + layerwise distillation (`come_sp`, `kl_raw`, lr 1e-3)"),
    ("M3", "come_lm_lora", "after training", "control_lora", "CoMe + LM-loss LoRA"),
    ("M4", "come_kd_lora", "after training", "control_lora", "CoMe + teacher-KL LoRA"),
    ("M5", "come_kd_full", "after training", "control_full", "CoMe + teacher-KL full-parameter"),
    (
        "M6a",
        "come_pipeline",
        "after distill_gap",
        "control_full",
        "CoMe pipeline, before healing: merge + `distill_gap` (merged layer and the next)",
    ),
    ("M6", "come_pipeline", "after training", f"control_{PIPELINE_HEAL}", "**CoMe pipeline**: + teacher-KL heal"),
]
DEFAULT_RUNS = ",".join(runs_for(8))
# A stage entry recorded alike by another run (same recipe section, same calibration): the row is read from
# there when its own run was not made (the >= 64k budget runs only the pipelines, their controls and bi_none).
SAME_ENTRY = {("bi_gap_mse", "after prune"): "bi_pipeline", ("come_mse", "after merge"): "come_pipeline"}
SETTINGS = ("model", "num_layers", "seq_len", "calibration_samples", "eval_samples")


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps (16 blocks x 128 tokens each) of every healed row")
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="comma-separated runs, in order (see runs_for)")
    parser.add_argument("--seeds", default="", help="extra seeds of the headline runs (pipeline and its control), e.g. 1,2")
    parser.add_argument("--model", default="demo", help="model source of every run (a small local directory for a quick check)")
    parser.add_argument("--num_layers", type=int, default=7)
    parser.add_argument("--seq_len", type=int, default=SEQ_LEN)
    parser.add_argument("--calibration_samples", type=int, default=16)
    parser.add_argument("--eval_samples", type=int, default=32, help="evaluation blocks per source")
    parser.add_argument("--task_runs", default="", help="runs (seed 0) whose saved model, and the dense model, get lm-eval accuracy")
    parser.add_argument("--tasks", default="arc_easy,piqa,boolq")
    parser.add_argument("--task_limit", type=int, default=300)
    parser.add_argument("--runs_dir", default=str(ROOT / "runs" / "repair_evidence"))
    parser.add_argument("--output", default=str(OUTPUT), help="JSON; the docs section is written only for the default one")
    return parser.parse_args()


def bind_checkout() -> None:
    """Import ``lightning_prune.callbacks`` / ``.recipes`` from this checkout's ``callbacks/`` / ``configs/``.

    An editable install maps them to the checkout it was installed from; when this checkout's
    ``lightning_prune`` is the one imported (a worktree, run from its root), its own callbacks and
    recipes must go with it.
    """
    import lightning_prune

    if Path(lightning_prune.__file__).resolve().parent != ROOT / "lightning_prune":
        return
    for name, folder in (("lightning_prune.callbacks", "callbacks"), ("lightning_prune.recipes", "configs")):
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(
                name, ROOT / folder / "__init__.py", submodule_search_locations=[str(ROOT / folder)]
            )
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)


def shared_flags(args: argparse.Namespace, seed: int = 0) -> list[str]:
    """The flags every run gets: model, the healing budget, calibration, the evaluation (and the seed)."""
    steps = args.steps
    flags = ["--model.init_args.model", args.model, "--evaluate", "true", "--trainer.enable_progress_bar", "false"]
    flags += ["--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps), "--trainer.limit_val_batches", "0"]
    flags += ["--trainer.accumulate_grad_batches", str(ACCUMULATE), "--trainer.callbacks", "[]"]
    flags += ["--trainer.enable_checkpointing", "false"]  # no Lightning default checkpoint (0.5-1 GB per run)
    flags += ["--data.init_args.batch_size", str(BATCH), "--data.init_args.num_train_samples", str(steps * ACCUMULATE * BATCH)]
    flags += ["--data.init_args.seq_len", str(args.seq_len), "--data.init_args.calibration_samples", str(args.calibration_samples)]
    flags += ["--prune.num_layers", str(args.num_layers), "--merge.num_layers", str(args.num_layers)]
    flags += ["--evaluation.data", "wikitext2,c4", "--evaluation.num_samples", str(args.eval_samples)]
    flags += ["--evaluation.seq_len", str(args.seq_len)]
    if seed:
        flags += ["--seed_everything", str(seed), "--data.init_args.seed", str(seed)]
    return flags


def split_key(key: str) -> tuple[str, int]:
    """``bi_pipeline#s2`` -> (``bi_pipeline``, 2); a plain key is seed 0."""
    name, _, seed = key.partition("#s")
    return name, int(seed or 0)


def run_dir(args: argparse.Namespace, key: str) -> Path:
    return Path(args.runs_dir) / f"{key.replace('#', '_')}_{args.steps}"


def shown(path: Path) -> str:
    """A path as the docs show it: relative to the repository when inside it."""
    return str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else str(path)


class Timed:
    """Seconds spent in ``EvaluationSuite.evaluate`` (so a run's wall time splits into evaluation and the rest)."""

    seconds = 0.0

    @classmethod
    def install(cls) -> None:
        from lightning_prune.evaluation.suite import EvaluationSuite

        evaluate = EvaluationSuite.evaluate

        def timed(self, *a, **k):
            start = time.perf_counter()
            try:
                return evaluate(self, *a, **k)
            finally:
                cls.seconds += time.perf_counter() - start

        EvaluationSuite.evaluate = timed


def run(args: argparse.Namespace, key: str) -> dict:
    """One recipe run in-process; its metrics.json entries plus wall, evaluation and stage seconds."""
    from lightning_prune.cli import main

    name, seed = split_key(key)
    directory = run_dir(args, key)
    recipe = runs_for(args.steps)[name]
    config, own = recipe[:2], recipe[2:]  # the run's own flags come last, so they win over the shared ones
    argv = ["fit", *config, *shared_flags(args, seed), *own, "--run_dir", shown(directory)]
    Timed.seconds, start, load = 0.0, time.perf_counter(), os.getloadavg()[0]
    main(argv)
    seconds = time.perf_counter() - start
    metrics = json.loads((directory / "metrics.json").read_text())
    entries = {k: v for k, v in metrics.items() if k not in ("settings", "versions")}
    stage = sum(v.get("seconds", 0.0) for v in entries.values())
    trained = "after training" in entries and "max_steps" not in own
    return {
        "command": "lightning-prune " + shlex.join(argv),
        "recipe_flags": shlex.join([*recipe, "--run_dir", shown(directory)]),
        "shared_flags": shlex.join(shared_flags(args)),
        "seed": seed,
        "entries": entries,
        "seconds": round(seconds, 1),
        "eval_seconds": round(Timed.seconds, 1),
        # 1-minute load average of the machine at the start and the end (the CPU is shared)
        "load": [round(load, 1), round(os.getloadavg()[0], 1)],
        "stage_seconds": round(stage, 1),
        # training + model load, export and save: the wall time less evaluation and stage planning
        "heal_seconds": round(seconds - Timed.seconds - stage, 1) if trained else None,
        "heal_tokens": args.steps * ACCUMULATE * BATCH * args.seq_len if trained else 0,
        "global_step": entries.get("after training", {}).get("global_step", 0),
    }


STAGE_ENTRIES = ("after prune", "after merge", "after distill_gap")


def layerwise_tokens(key: str, entry: str, budget: dict, tokens: int) -> int:
    """Tokens a row's training saw: the heal budget; a budget-matched distill_gap window the same; else 0."""
    if entry == "after training":
        return budget["runs"][key]["heal_tokens"]
    if entry == "after distill_gap" and key in ("bi_gap_mse", "bi_gap_kl"):
        return tokens
    return 0


def rows(budget: dict, settings: dict, steps: int) -> list[dict]:
    """The table rows measured so far (seed 0), each with its ratios to its control and to the dense model."""
    runs, out = budget["runs"], []
    tokens = steps * ACCUMULATE * BATCH * settings["seq_len"]
    dense = next((r["entries"]["dense"]["perplexity"] for r in runs.values() if "dense" in r["entries"]), None)
    for number, key, entry, control, label in ROWS:
        if key not in runs and (key, entry) in SAME_ENTRY:
            key = SAME_ENTRY[key, entry]
        if key not in runs or entry not in runs[key]["entries"]:
            continue
        r, ppl = runs[key], runs[key]["entries"][entry]["perplexity"]
        base = runs.get(control, {}).get("entries", {}).get("after training", {}).get("perplexity") if control else None
        healed = entry == "after training"
        out.append(
            {
                "row": number,
                "label": label.format(n=settings["num_layers"]),
                "run": key,
                "entry": entry,
                "control": control,
                "perplexity": ppl,
                "ratio": {k: ppl[k] / base[k] for k in ppl} if base else None,
                "ratio_dense": {k: ppl[k] / dense[k] for k in ppl} if dense else None,
                "num_layers": r["entries"][entry]["num_layers"],
                "num_parameters": r["entries"][entry]["num_parameters"],
                "tasks": budget.get("tasks", {}).get(key if entry == "after training" else None),
                "tokens": layerwise_tokens(key, entry, budget, tokens),
                "heal_seconds": r["heal_seconds"] if healed else None,
                "stage_seconds": r["stage_seconds"] if entry != "dense" and any(k in r["entries"] for k in STAGE_ENTRIES) else None,
            }
        )
    return out


def seed_spread(budget: dict) -> dict[str, dict]:
    """Per pipeline run: its C4 / WikiText-2 ratios over the control for every seed measured with both runs."""
    control, out = HEADLINE[-1], {}
    for pipeline in HEADLINE[:-1]:
        seeds = sorted({split_key(k)[1] for k in budget["runs"] if split_key(k)[0] == pipeline})
        ratios = {}
        for seed in seeds:
            suffix = f"#s{seed}" if seed else ""
            a, b = budget["runs"].get(pipeline + suffix), budget["runs"].get(control + suffix)
            if a and b and "after training" in a["entries"] and "after training" in b["entries"]:
                p, q = a["entries"]["after training"]["perplexity"], b["entries"]["after training"]["perplexity"]
                ratios[seed] = {"pipeline": p, "control": q, "ratio": {k: p[k] / q[k] for k in p}}
        if len(ratios) >= 2:
            c4 = [v["ratio"]["c4"] for v in ratios.values()]
            out[pipeline] = {"seeds": ratios, "c4_mean": statistics.mean(c4), "c4_min": min(c4), "c4_max": max(c4)}
    return out


def verdict(by_row: dict, spread: dict[str, dict]) -> list[str]:
    """The issue's target, checked on the out-of-domain (C4) perplexity of the rows present."""
    c4 = {n: r["perplexity"]["c4"] for n, r in by_row.items()}
    lines = []
    for row, what in (("R6", "Full pipeline (removal)"), ("M6", "CoMe pipeline")):
        if row in by_row and by_row[row]["ratio"]:
            ratio = by_row[row]["ratio"]["c4"]
            line = (
                f"- {what} within 1.3× of the equally-healed dense control out of domain: **{'met' if ratio <= 1.3 else 'not met'}** "
                f"(row {row} / its control on C4 = {ratio:.3f}; over the dense model without healing {by_row[row]['ratio_dense']['c4']:.3f}"
            )
            seeds = spread.get(by_row[row]["run"])
            if seeds:
                values = ", ".join(f"seed {s}: {v['ratio']['c4']:.3f}" for s, v in seeds["seeds"].items())
                line += f"; {values}; mean {seeds['c4_mean']:.3f}, range {seeds['c4_min']:.3f}–{seeds['c4_max']:.3f}"
            lines.append(line + ").")

    def checked(steps: list[tuple[str, str, str]]) -> list[tuple[str, str, str, bool]]:
        return [(a, b, what, c4[b] < c4[a]) for a, b, what in steps if a in c4 and b in c4]

    def line(title: str, checks: list) -> str:
        return (
            f"- {title}: **{'met' if all(ok for *_, ok in checks) else 'not met'}** ("
            + "; ".join(f"{a} → {b} ({what}): {c4[a]:.2f} → {c4[b]:.2f}, {'lower' if ok else 'NOT lower'}" for a, b, what, ok in checks)
            + ")."
        )

    step_checks = (
        (
            "Each step of the removal pipeline lowering C4 perplexity over the step before it",
            [("R0", "R1", "compensation"), ("R1", "R6a", "gap distillation"), ("R6a", "R6", "teacher-KL heal after gap distillation")],
        ),
        (
            "Removal, each other repair lowering C4 perplexity below the row it starts from",
            [
                ("R1", "R2", "`distill_gap` `mse_norm`, budget-matched"),
                ("R1", "R2k", "`distill_gap` `kl_raw`, budget-matched"),
                ("R1", "R3", "LM-loss LoRA"),
                ("R1", "R4", "teacher-KL LoRA"),
                ("R3", "R4", "teacher KL instead of LM loss"),
                ("R1", "R5", "teacher-KL full-parameter"),
                ("R5", "R6", "gap distillation before the full-parameter heal"),
            ],
        ),
        (
            "CoMe: each repair lowering C4 perplexity below the row it starts from",
            [
                ("M0", "M2", "`come_sp` `mse_norm`"),
                ("M0", "M2k", "`come_sp` `kl_raw`"),
                ("M0", "M3", "LM-loss LoRA"),
                ("M0", "M4", "teacher-KL LoRA"),
                ("M0", "M5", "teacher-KL full-parameter"),
                ("M0", "M6a", "gap distillation"),
                ("M6a", "M6", "teacher-KL heal after gap distillation"),
            ],
        ),
    )
    for title, steps in step_checks:
        checks = checked(steps)
        if checks:
            lines.append(line(title, checks))
    return lines


def markdown(record: dict) -> str:
    s = record["settings"]
    lines = [
        "## Repair steps vs the equally-healed dense control (`benchmarks/repair_evidence.py`)",
        "",
        f"SmolLM2-135M (`demo`), {s['num_layers']} of 30 layers removed (iterative Block Influence) or merged away (CoMe). "
        "Every row is a shipped recipe run through `lightning-prune fit` in-process, read from its `metrics.json`. Calibration: "
        f"{s['calibration_samples']} × {s['seq_len']} WikiText-2-valid blocks. Healing data: WikiText-2 valid, {BATCH} blocks × "
        f"{ACCUMULATE} accumulated batches × {s['seq_len']} tokens per optimizer step, seed 0. Evaluation: the first "
        f"{s['eval_samples']} × {s['seq_len']} blocks of WikiText-2 test (in domain) and of the bundled C4 test half (out of "
        "domain, used for nothing else). Heal settings (chosen on held-out text by `benchmarks/heal_selection.py`; its figures are in the findings below): "
        + "; ".join(f"{kind}: `{' '.join(flags)}`" for kind, flags in HEALS.items())
        + " on top of `prune_distill_heal` (teacher: the dense model, forward KL; LoRA r8 / alpha 16 / dropout 0.05 on "
        "every projection; full-parameter: embeddings frozen). Controls: the dense model healed with the same heal, budget "
        "and data and the LM loss (row 2 for LoRA rows, row 3 for the others). `ratio` = row / its control; `/ dense` = row / "
        "row 1. Tokens = tokens the row's training saw (layerwise rows: per gap window; the pipeline's `distill_gap` adds "
        "its recipe default of 100 steps × 2 calibration blocks per window to the heal budget). Heal s = wall time of the run "
        "less evaluation and stage planning (model load, export and save included); stage s = stage planning (BI scoring, "
        "compensation, merging, gap distillation). Two CPU threads (`OMP_NUM_THREADS=2`) on a 2-core machine; the load average before → after each run is listed with its command.",
    ]
    for steps, budget in sorted(record["budgets"].items(), key=lambda item: int(item[0])):
        table = rows(budget, s, int(steps))
        tokens = int(steps) * ACCUMULATE * BATCH * s["seq_len"]
        tasks = budget.get("task_names", [])
        lines += [
            "",
            f"### {steps} optimizer steps = {tokens:,} healing tokens per healed row",
            "",
            "| row | model | layers | tokens | stage s | heal s | PPL WikiText-2 | PPL C4 | ratio WikiText-2 | ratio C4 | C4 / dense |"
            + "".join(f" {t} acc |" for t in tasks),
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(tasks),
        ]
        for r in table:
            ratio = r["ratio"] or {}
            cells = [r["row"], r["label"], f"{r['num_layers']}", f"{r['tokens']:,}"]
            cells += [f"{r['stage_seconds']:.0f}" if r["stage_seconds"] is not None else "-"]
            cells += [f"{r['heal_seconds']:.0f}" if r["heal_seconds"] is not None else "-"]
            cells += [f"{r['perplexity']['wikitext2']:.2f}", f"{r['perplexity']['c4']:.2f}"]
            cells += [f"{ratio[k]:.3f}" if k in ratio else "-" for k in ("wikitext2", "c4")]
            cells += [f"{r['ratio_dense']['c4']:.3f}" if r["ratio_dense"] else "-"]
            scores = r["tasks"] or (budget.get("tasks", {}).get("dense") if r["row"] == "1" else None)
            cells += [f"{scores[t]['acc']:.3f} ± {scores[t]['acc_stderr']:.3f}" if scores else "-" for t in tasks]
            lines.append("| " + " | ".join(cells) + " |")
        by_row = {r["row"]: r for r in table}
        spread = seed_spread(budget)
        lines += ["", *verdict(by_row, spread)]
        if tasks:
            lines += [
                "",
                f"Accuracy: lm-eval 0-shot `acc` ± its stderr on the first {budget['task_limit']} items of each bundled task, "
                "measured on the saved model of the run (`lightning-prune evaluate --model <run_dir>/model --tasks "
                f"{','.join(tasks)} --limit {budget['task_limit']}`; row 1: `--model {s['model']}`).",
            ]
        for pipeline, seeds in spread.items():
            lines += [
                "",
                f"Seeds of `{pipeline}` (it and its control rerun with `--seed_everything N --data.init_args.seed N`: other "
                "calibration and training draws): "
                + "; ".join(
                    f"seed {seed}: pipeline {v['pipeline']['wikitext2']:.2f} / {v['pipeline']['c4']:.2f}, control "
                    f"{v['control']['wikitext2']:.2f} / {v['control']['c4']:.2f}, ratio {v['ratio']['wikitext2']:.3f} / {v['ratio']['c4']:.3f}"
                    for seed, v in seeds["seeds"].items()
                )
                + " (WikiText-2 / C4).",
            ]
        picks = [
            f"{key} removed `{d['removed_layers']}`"
            if "removed_layers" in d
            else f"{key} merged `{[g for g in d['groups'] if len(g) > 1]}`"
            for key, run in budget["runs"].items()
            for d in run.get("decisions", [])
            if ("removed_layers" in d or "groups" in d) and (key.startswith(("bi_none", "bi_pipeline", "come_mse")))
        ]
        if picks:
            lines += [
                "",
                "Decisions (original layer indices; prune: removal order; merge: the groups that became one layer): "
                + "; ".join(picks)
                + ".",
            ]
        shared = {run["shared_flags"] for run in budget["runs"].values()}
        lines += [
            "",
            "Commands: `lightning-prune fit` + the run's flags + the shared flags "
            + " ".join(f"`{flags}`" for flags in sorted(shared))
            + " (seeded reruns add `--seed_everything N --data.init_args.seed N`; each run also records the dense model and, "
            "with a stage, the model after it; wall time in brackets):",
            "",
        ]
        lines += [
            f"- `{key}` ({run['seconds']:.0f} s"
            + (f", load {run['load'][0]:g} → {run['load'][1]:g}" if "load" in run else "")
            + f"): `{run['recipe_flags']}`"
            for key, run in budget["runs"].items()
        ]
        seeds = sorted({split_key(k)[1] for k in budget["runs"]} - {0})
        plain = [k for k in budget["runs"] if "#" not in k]
        lines += [
            "",
            f"Total wall time of these runs: {sum(r['seconds'] for r in budget['runs'].values()) / 3600:.1f} h. Reproduce: "
            f"`OMP_NUM_THREADS=2 .venv/bin/python benchmarks/repair_evidence.py --steps {steps} --runs {','.join(plain)}"
            + (f" --seeds {','.join(map(str, seeds))}" if seeds else "")
            + (f" --task_runs {','.join(budget.get('tasks', {}).keys() - {'dense'})}" if tasks else "")
            + "` (runs already in the JSON are kept).",
        ]
    return "\n".join(lines)


def decisions(run_dir: Path) -> list[dict]:
    """The removed layers / merge groups of a run's decisions.json (for the table's footnote)."""
    path = run_dir / "decisions.json"
    if not path.exists():
        return []
    plan = json.loads(path.read_text())
    return [{k: d[k] for k in ("kind", "removed_layers", "groups") if k in d} for d in plan.get("decisions", [])]


def task_accuracy(args: argparse.Namespace, key: str, model: str) -> dict:
    """lm-eval accuracy of a saved model (``lightning-prune evaluate``), per task: acc, acc_stderr, acc_norm, ..."""
    from lightning_prune.cli import main

    out = Path(args.runs_dir) / "tasks" / f"{key.replace('#', '_')}_{args.steps}"
    flags = ["--eval_data", "wikitext2", "--eval_samples", "1", "--tasks", args.tasks, "--limit", str(args.task_limit)]
    start = time.perf_counter()
    main(["evaluate", "--model", model, *flags, "--dtype", "float32", "--output_dir", str(out), "--overwrite", "true"])
    scores = json.loads((out / "metrics.json").read_text())["tasks"]
    return {**scores, "seconds": round(time.perf_counter() - start, 1)}


def save(record: dict, args: argparse.Namespace) -> None:
    from lightning_prune.results import package_versions

    record["versions"] = package_versions()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    if Path(args.output).resolve() == OUTPUT.resolve():
        update_section("healing", "repair-evidence", markdown(record))


def main() -> None:
    args = arguments()
    bind_checkout()
    Timed.install()
    settings = {k: getattr(args, k) for k in SETTINGS}
    record = {"budgets": {}, "settings": settings}
    if Path(args.output).exists():
        record = json.loads(Path(args.output).read_text())
        different = [k for k in SETTINGS if record["settings"].get(k) != settings[k]]
        if different:
            raise SystemExit(f"{args.output} was measured with other settings ({', '.join(different)}); pass another --output")
    budget = record["budgets"].setdefault(str(args.steps), {"runs": {}})
    keys = [k.strip() for k in args.runs.split(",") if k.strip()]
    keys += [f"{name}#s{seed}" for seed in [int(x) for x in args.seeds.split(",") if x.strip()] for name in HEADLINE]
    for key in keys:
        if split_key(key)[0] not in runs_for(args.steps):
            raise SystemExit(f"--runs: {key!r} is not a run; choose from {', '.join(runs_for(args.steps))}")
        if key in budget["runs"]:
            continue
        result = run(args, key)
        result["decisions"] = decisions(run_dir(args, key))
        budget["runs"][key] = result
        save(record, args)
        print(
            f"{key}: {result['seconds']:.0f} s (evaluation {result['eval_seconds']:.0f} s, stage {result['stage_seconds']:.0f} s)",
            flush=True,
        )
    task_runs = [k.strip() for k in args.task_runs.split(",") if k.strip()]
    if task_runs:
        budget["task_names"], budget["task_limit"] = args.tasks.split(","), args.task_limit
        scores = budget.setdefault("tasks", {})
        for other in record["budgets"].values():  # the dense model's scores do not depend on the budget
            shared = ("task_names", "task_limit")
            if other is not budget and "dense" in other.get("tasks", {}) and all(other.get(k) == budget[k] for k in shared):
                scores.setdefault("dense", other["tasks"]["dense"])
        for key in ["dense", *task_runs]:
            if key not in scores:
                scores[key] = task_accuracy(args, key, args.model if key == "dense" else str(run_dir(args, key) / "model"))
                save(record, args)
    save(record, args)
    for r in rows(budget, settings, args.steps):
        if r["ratio"]:
            print(
                f"row {r['row']:>3} {r['label']}: PPL WikiText-2 {r['perplexity']['wikitext2']:.2f} C4 {r['perplexity']['c4']:.2f}; "
                f"ratio to {r['control']}: {r['ratio']['wikitext2']:.3f} / {r['ratio']['c4']:.3f}"
            )
    print("\n".join(verdict({r["row"]: r for r in rows(budget, settings, args.steps)}, seed_spread(budget))))


if __name__ == "__main__":
    main()
