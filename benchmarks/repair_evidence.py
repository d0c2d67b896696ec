"""Evidence for repair (issue 13): which repair steps bring a 30 -> 23 layer SmolLM2 close to a dense model healed alike.

Every row is a shipped recipe run in-process through ``lightning_prune.cli.main`` (what a user of
``lightning-prune fit --config ...`` gets), read back from its ``run_dir/metrics.json``:

1. dense, no healing; 2. dense + LM-loss LoRA r2 (the control of the ``prune_heal`` LoRA);
2b. dense + LoRA r8 on every projection (the control of the ``prune_distill_heal`` LoRA);
3. iterative Block Influence removal of 7 layers, no repair; 4. + magnitude compensation;
5. + compensation + LM-loss LoRA (``prune_heal``); 6. + compensation + teacher-distillation LoRA
(``prune_distill_heal``); 4g / 6g. the same with gap distillation between compensation and LoRA
(``prune_gap_heal``: its ``after distill_gap`` and ``after training`` entries); 7. CoMe merge of 7 layers (``come_sp``), no repair;
8. CoMe + layerwise distillation (sp, ``mse_norm``); 9. CoMe + layerwise distillation (``kl_raw``).

Every healed row trains on the same WikiText-2-valid tokens (``--steps`` optimizer steps x 16
blocks x 128 tokens) and every row is measured on the same blocks of WikiText-2 test (in domain)
and of the bundled C4 sample (out of domain, used for nothing else). Rows 1, 3, 4 and 7 are the
``dense`` / ``after prune`` / ``after merge`` entries of the same runs (row 3 is a dry run with
``--prune.compensation none``). The JSON (``benchmarks/results/repair_evidence.json``, one entry per
budget) and the ``repair-evidence`` section of ``docs/results/healing.md`` are written after every
run, so a run cut short keeps its rows (``--reuse`` measures only the rest).

Usage: OMP_NUM_THREADS=2 python benchmarks/repair_evidence.py [--steps 8] [--runs control_r2,bi_lora,...] [--reuse]
"""

import argparse
import importlib.util
import json
import os
import shlex
import sys
import time
from pathlib import Path

from report import ROOT, update_section

RUNS = {  # key -> recipe flags (besides the shared budget and evaluation flags)
    "control_r2": ["--config", "prune_heal", "--stages", "[]"],
    "control_r8": ["--config", "prune_distill_heal", "--stages", "[]", "--model.init_args.distill", "null"],
    # removal without compensation: its "after prune" entry (one optimizer step so the run records it)
    "bi_none": ["--config", "prune_heal", "--prune.compensation", "none", "--trainer.max_steps", "1", "--trainer.val_check_interval", "1"],
    "bi_lora": ["--config", "prune_heal"],
    "bi_distill": ["--config", "prune_distill_heal"],
    "bi_gap": ["--config", "prune_gap_heal"],
    "come_mse": ["--config", "come_sp", "--model.init_args.loss", "mse_norm", "--model.init_args.learning_rate", "1e-3"],
    "come_kl": ["--config", "come_sp", "--model.init_args.loss", "kl_raw", "--model.init_args.learning_rate", "1e-3"],
}
# (row, run, metrics.json entry, control run, what the row is)
ROWS = [
    ("1", "control_r2", "dense", "control_r2", "dense, no healing"),
    ("2", "control_r2", "after training", "control_r2", "dense + LM-loss LoRA r2 (control)"),
    ("2b", "control_r8", "after training", "control_r8", "dense + LM-loss LoRA r8, all projections (control)"),
    ("3", "bi_none", "after prune", "control_r2", "BI iterative, {n} layers removed, no repair"),
    ("4", "bi_lora", "after prune", "control_r2", "+ magnitude compensation"),
    ("5", "bi_lora", "after training", "control_r2", "+ compensation + LM-loss LoRA r2 (`prune_heal`)"),
    ("6", "bi_distill", "after training", "control_r8", "+ compensation + teacher-KL LoRA r8 (`prune_distill_heal`)"),
    ("4g", "bi_gap", "after distill_gap", "control_r2", "+ compensation + gap distillation (`distill_gap`), no LoRA"),
    ("6g", "bi_gap", "after training", "control_r8", "+ compensation + gap distillation + teacher-KL LoRA r8 (`prune_gap_heal`)"),
    ("7", "come_mse", "after merge", "control_r2", "CoMe merge, {n} layers merged away, no repair"),
    ("8", "come_mse", "after training", "control_r2", "CoMe + layerwise distillation sp, `mse_norm`, lr 1e-3"),
    ("9", "come_kl", "after training", "control_r2", "CoMe + layerwise distillation sp, `kl_raw`, lr 1e-3"),
]
DEFAULT_RUNS = "control_r2,bi_lora,bi_distill,control_r8,bi_none,come_mse,come_kl"
SETTINGS = ("model", "num_layers", "batch_size", "accumulate", "seq_len", "calibration_samples", "eval_samples", "tasks", "task_limit")


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps of every healed row")
    parser.add_argument("--runs", default=DEFAULT_RUNS, help=f"comma-separated runs, in order, from: {', '.join(RUNS)}")
    parser.add_argument("--model", default="demo", help="model source of every run (a small local directory for a quick check)")
    parser.add_argument("--num_layers", type=int, default=7)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--accumulate", type=int, default=4, help="batches per optimizer step")
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--calibration_samples", type=int, default=16)
    parser.add_argument("--eval_samples", type=int, default=32, help="evaluation blocks per source")
    parser.add_argument("--tasks", default="", help="lm-eval tasks measured in every entry of every run (slow), e.g. arc_easy,piqa")
    parser.add_argument("--task_limit", type=int, default=200)
    parser.add_argument("--reuse", action="store_true", help="keep the runs already in --output (same settings) and run only the rest")
    parser.add_argument("--runs_dir", default=str(ROOT / "runs" / "repair_evidence"))
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "repair_evidence.json"))
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


def shared_flags(args: argparse.Namespace) -> list[str]:
    """The flags every run gets: model, the healing budget, calibration, the evaluation."""
    steps = args.steps
    flags = ["--model.init_args.model", args.model, "--evaluate", "true", "--trainer.enable_progress_bar", "false"]
    flags += ["--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps), "--trainer.limit_val_batches", "0"]
    flags += ["--trainer.accumulate_grad_batches", str(args.accumulate), "--trainer.callbacks", "[]"]
    flags += ["--trainer.enable_checkpointing", "false"]  # no Lightning default checkpoint (0.5-1 GB per run)
    flags += [
        "--data.init_args.batch_size",
        str(args.batch_size),
        "--data.init_args.num_train_samples",
        str(steps * args.accumulate * args.batch_size),
    ]
    flags += ["--data.init_args.seq_len", str(args.seq_len), "--data.init_args.calibration_samples", str(args.calibration_samples)]
    flags += ["--prune.num_layers", str(args.num_layers), "--merge.num_layers", str(args.num_layers)]
    flags += [
        "--evaluation.data",
        "wikitext2,c4",
        "--evaluation.num_samples",
        str(args.eval_samples),
        "--evaluation.seq_len",
        str(args.seq_len),
    ]
    if args.tasks:
        flags += ["--evaluation.tasks", args.tasks, "--evaluation.limit", str(args.task_limit)]
    return flags


def run_dir(args: argparse.Namespace, key: str) -> Path:
    return Path(args.runs_dir) / f"{key}_{args.steps}"


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

    directory = run_dir(args, key)
    config, own = RUNS[key][:2], RUNS[key][2:]  # the run's own flags come last, so they win over the shared ones
    argv = ["fit", *config, *shared_flags(args), *own, "--run_dir", shown(directory)]
    Timed.seconds, start, load = 0.0, time.perf_counter(), os.getloadavg()[0]
    main(argv)
    seconds = time.perf_counter() - start
    metrics = json.loads((directory / "metrics.json").read_text())
    entries = {k: v for k, v in metrics.items() if k not in ("settings", "versions")}
    stage = sum(v.get("seconds", 0.0) for v in entries.values())
    trained = "after training" in entries
    return {
        "command": "lightning-prune " + shlex.join(argv),
        "recipe_flags": shlex.join([*RUNS[key], "--run_dir", shown(directory)]),
        "shared_flags": shlex.join(shared_flags(args)),
        "entries": entries,
        "seconds": round(seconds, 1),
        "eval_seconds": round(Timed.seconds, 1),
        # 1-minute load average of the machine at the start and the end (the CPU is shared)
        "load": [round(load, 1), round(os.getloadavg()[0], 1)],
        "stage_seconds": round(stage, 1),
        # training + model load, export and save: the wall time less evaluation and stage planning
        "heal_seconds": round(seconds - Timed.seconds - stage, 1) if trained else None,
        "heal_tokens": args.steps * args.accumulate * args.batch_size * args.seq_len if trained else 0,
        "global_step": entries.get("after training", {}).get("global_step", 0),
    }


STAGE_ENTRIES = ("after prune", "after merge", "after distill_gap")


def rows(runs: dict, num_layers: int) -> list[dict]:
    """The table rows measured so far, each with its ratio to the matching dense control."""
    out = []
    for number, key, entry, control, label in ROWS:
        if key not in runs or entry not in runs[key]["entries"]:
            continue
        r, ppl = runs[key], runs[key]["entries"][entry]["perplexity"]
        base = runs.get(control, {}).get("entries", {}).get("after training", {}).get("perplexity")
        healed = entry == "after training"
        out.append(
            {
                "row": number,
                "label": label.format(n=num_layers),
                "run": key,
                "entry": entry,
                "control": control,
                "perplexity": ppl,
                "ratio": {k: ppl[k] / base[k] for k in ppl} if base else None,
                "num_layers": r["entries"][entry]["num_layers"],
                "num_parameters": r["entries"][entry]["num_parameters"],
                "tasks": r["entries"][entry].get("tasks"),
                "heal_tokens": r["heal_tokens"] if healed else 0,
                "heal_seconds": r["heal_seconds"] if healed else None,
                "stage_seconds": r["stage_seconds"] if entry != "dense" and any(k in r["entries"] for k in STAGE_ENTRIES) else None,
            }
        )
    return out


def verdict(by_row: dict) -> list[str]:
    """The issue's target, checked on the out-of-domain (C4) perplexity of the rows present."""
    c4 = {n: r["perplexity"]["c4"] for n, r in by_row.items()}
    lines = []
    if "6" in by_row and by_row["6"]["ratio"]:
        ratio = by_row["6"]["ratio"]["c4"]
        other = by_row["6"]["perplexity"]["c4"] / by_row["2"]["perplexity"]["c4"] if "2" in by_row else None
        lines.append(
            f"- Full pipeline within 1.3× of the equally-healed dense control out of domain: **{'met' if ratio <= 1.3 else 'not met'}** "
            f"(row 6 / row 2b on C4 = {ratio:.3f}" + (f"; / row 2 = {other:.3f}" if other else "") + ")."
        )

    def checked(steps: list[tuple[str, str, str]]) -> list[tuple[str, str, str, bool]]:
        return [(a, b, what, c4[b] < c4[a]) for a, b, what in steps if a in c4 and b in c4]

    def line(title: str, checks: list) -> str:
        return (
            f"- {title}: **{'met' if all(ok for *_, ok in checks) else 'not met'}** ("
            + "; ".join(f"row {a} → {b} ({what}): {c4[a]:.2f} → {c4[b]:.2f}, {'lower' if ok else 'NOT lower'}" for a, b, what, ok in checks)
            + ")."
        )

    pipeline = checked(
        [
            ("3", "4", "compensation"),
            ("4", "5", "LM-loss LoRA"),
            ("4", "6", "teacher-KL LoRA"),
            ("5", "6", "teacher KL instead of LM loss"),
            ("4", "4g", "gap distillation"),
            ("4g", "6g", "teacher-KL LoRA after gap distillation"),
            ("6", "6g", "gap distillation before the LoRA"),
        ]
    )
    if pipeline:
        lines.append(line("Each repair step of the prune pipeline lowering C4 perplexity over the step before it", pipeline))
    come = checked([("7", "8", "distillation `mse_norm`"), ("7", "9", "distillation `kl_raw`")])
    if come:
        lines.append(line("CoMe: each layerwise distillation lowering C4 perplexity below the merged model", come))
    return lines


def markdown(record: dict) -> str:
    s = record["settings"]
    lines = [
        "## Repair steps vs the equally-healed dense control (`benchmarks/repair_evidence.py`)",
        "",
        f"SmolLM2-135M (`demo`), {s['num_layers']} of 30 layers removed (iterative Block Influence) or merged away (CoMe). "
        f"Every row is a shipped recipe run through `lightning-prune fit` in-process, read from its `metrics.json`. Calibration: "
        f"{s['calibration_samples']} × {s['seq_len']} WikiText-2-valid blocks; healing data: WikiText-2 valid, "
        f"{s['batch_size']} blocks × {s['accumulate']} accumulated batches × {s['seq_len']} tokens per optimizer step, seed 0. Evaluation: "
        f"the first {s['eval_samples']} × {s['seq_len']} blocks of WikiText-2 test (in domain) and of the bundled C4 sample (out of "
        "domain, used for nothing else). Ratios divide by the dense model healed with the same adapters and budget "
        "(row 2 = `prune_heal`'s LoRA r2 on gate/up/down, LM loss; row 2b = `prune_distill_heal`'s LoRA r8 on all projections, "
        "LM loss); the unhealed rows and the CoMe rows are divided by row 2. Heal s = wall time of the run less evaluation and "
        "stage planning (so it includes model load, export and save), on a 2-core CPU shared with other jobs.",
    ]
    for steps, budget in sorted(record["budgets"].items(), key=lambda item: int(item[0])):
        table = rows(budget["runs"], s["num_layers"])
        tokens = int(steps) * s["accumulate"] * s["batch_size"] * s["seq_len"]
        tasks = [t for t in s["tasks"].split(",") if t] if s.get("tasks") else []
        lines += [
            "",
            f"### {steps} optimizer steps = {tokens:,} healing tokens per healed row",
            "",
            "| row | model | layers | heal tokens | stage s | heal s | PPL WikiText-2 | PPL C4 | ratio WikiText-2 | ratio C4 | control |"
            + "".join(f" {t} acc_norm |" for t in tasks),
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|" + "---:|" * len(tasks),
        ]
        for r in table:
            ratio = r["ratio"] or {}
            cells = [r["row"], r["label"], f"{r['num_layers']}", f"{r['heal_tokens']:,}"]
            cells += [f"{r['stage_seconds']:.0f}" if r["stage_seconds"] is not None else "-"]
            cells += [f"{r['heal_seconds']:.0f}" if r["heal_seconds"] is not None else "-"]
            cells += [f"{r['perplexity']['wikitext2']:.2f}", f"{r['perplexity']['c4']:.2f}"]
            cells += [f"{ratio[k]:.3f}" if k in ratio else "-" for k in ("wikitext2", "c4")]
            cells += [{"control_r2": "2", "control_r8": "2b"}[r["control"]]]
            cells += [f"{r['tasks'][t]['acc_norm']:.3f}" if r.get("tasks") else "-" for t in tasks]
            lines.append("| " + " | ".join(cells) + " |")
        by_row = {r["row"]: r for r in table}
        lines += ["", *verdict(by_row)]
        removed = [
            f"{key} removed `{d['removed_layers']}`"
            if "removed_layers" in d
            else f"{key} merged `{[g for g in d['groups'] if len(g) > 1]}`"
            for key in ("bi_none", "bi_lora", "bi_distill", "bi_gap", "come_mse")
            for d in budget["runs"].get(key, {}).get("decisions", [])
            if "removed_layers" in d or "groups" in d
        ]
        if removed:
            lines += [
                "",
                "Decisions (original layer indices; prune: removal order; merge: the groups that became one layer): "
                + "; ".join(removed)
                + ".",
            ]
        shared = {run["shared_flags"] for run in budget["runs"].values()}
        lines += [
            "",
            "Commands: `lightning-prune fit` + the run's flags + the shared flags "
            + " ".join(f"`{flags}`" for flags in sorted(shared))
            + " (each run also records the dense model and, with a stage, the model after it; wall time in brackets):",
            "",
        ]
        lines += [
            f"- `{key}` ({run['seconds']:.0f} s"
            + (f", load {run['load'][0]:g} → {run['load'][1]:g}" if "load" in run else "")
            + f"): `{run['recipe_flags']}`"
            for key, run in budget["runs"].items()
        ]
        lines += [
            "",
            f"Total wall time of these runs: {sum(r['seconds'] for r in budget['runs'].values()) / 60:.1f} min. Reproduce: "
            f"`OMP_NUM_THREADS=2 .venv/bin/python benchmarks/repair_evidence.py --steps {steps} --runs {','.join(budget['runs'])}` "
            "(`--reuse` keeps the runs already in the JSON and runs the rest).",
        ]
    return "\n".join(lines)


def decisions(run_dir: Path) -> list[dict]:
    """The removed layers / merge groups of a run's decisions.json (for the table's footnote)."""
    path = run_dir / "decisions.json"
    if not path.exists():
        return []
    plan = json.loads(path.read_text())
    return [{k: d[k] for k in ("kind", "removed_layers", "groups") if k in d} for d in plan.get("decisions", [])]


def main() -> None:
    args = arguments()
    bind_checkout()
    from lightning_prune.results import package_versions

    Timed.install()
    settings = {k: getattr(args, k) for k in SETTINGS}
    record = {"budgets": {}, "settings": settings}
    if args.reuse and Path(args.output).exists():
        record = json.loads(Path(args.output).read_text())
        different = [k for k in SETTINGS if record["settings"].get(k) != settings[k]]
        if different:
            raise SystemExit(f"--reuse: {args.output} was measured with other settings ({', '.join(different)})")
    budget = record["budgets"].setdefault(str(args.steps), {"runs": {}})
    for key in [k.strip() for k in args.runs.split(",") if k.strip()]:
        if key not in RUNS:
            raise SystemExit(f"--runs: {key!r} is not a run; choose from {', '.join(RUNS)}")
        if key in budget["runs"]:
            continue
        result = run(args, key)
        result["decisions"] = decisions(run_dir(args, key))
        budget["runs"][key] = result
        record["versions"] = package_versions()
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
        update_section("healing", "repair-evidence", markdown(record))
        print(
            f"{key}: {result['seconds']:.0f} s (evaluation {result['eval_seconds']:.0f} s, stage {result['stage_seconds']:.0f} s)",
            flush=True,
        )
    update_section("healing", "repair-evidence", markdown(record))
    for r in rows(budget["runs"], args.num_layers):
        if r["ratio"]:
            print(
                f"row {r['row']:>2} {r['label']}: PPL WikiText-2 {r['perplexity']['wikitext2']:.2f} C4 {r['perplexity']['c4']:.2f}; "
                f"ratio to {r['control']}: {r['ratio']['wikitext2']:.3f} / {r['ratio']['c4']:.3f}"
            )
    print("\n".join(verdict({r["row"]: r for r in rows(budget["runs"], args.num_layers)})))


if __name__ == "__main__":
    main()
