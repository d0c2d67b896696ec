"""Evidence for healing (issue 6): prune 7/30 layers of SmolLM2, heal with LoRA / QLoRA, compare.

Rows, all measured in one run with the same evaluation blocks and task items:
dense; BI-pruned (iterative Block Influence + magnitude compensation); random-pruned (same count,
same compensation); the BI-pruned model with its base quantised to NF4 (what QLoRA starts from);
and after the same healing budget: BI + LoRA, BI + QLoRA, random + LoRA, and the control
dense + LoRA (domain adaptation alone). Healing data: WikiText-2 valid; evaluation: WikiText-2
test (in domain), C4 (out of domain, never used for healing) and, with ``--tasks``, lm-eval
accuracy (acc, acc_norm) on the bundled multiple-choice files. Prints the pruned / dense
perplexity ratio after equal healing. Results (JSON and the ``healing-evidence`` section of
``docs/results/healing.md``) are written after every row, so a run cut short keeps its rows.

Usage: OMP_NUM_THREADS=2 python benchmarks/healing_evidence.py --tasks arc_easy,piqa --task_limit 500
"""

import argparse
import json
import time
from pathlib import Path

import torch
from report import ROOT, update_section

from lightning_prune.commands.common import EvaluationData, split_names
from lightning_prune.commands.prune import prune
from lightning_prune.evaluation.harness import evaluate_tasks
from lightning_prune.lora import quantize_model
from lightning_prune.model.loading import load_model
from lightning_prune.results import model_summary, package_versions
from lightning_prune.stages import PruneStage

ORDER = ["dense", "dense + LoRA", "BI-pruned", "BI + LoRA", "BI NF4 base (no healing)", "BI + QLoRA", "random-pruned", "random + LoRA"]


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_layers", type=int, default=7)
    parser.add_argument("--calibration_samples", type=int, default=16)
    parser.add_argument("--heal_steps", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--wiki_samples", type=int, default=32)
    parser.add_argument("--c4_samples", type=int, default=16)
    parser.add_argument("--tasks", default="arc_easy,piqa", help="lm-eval tasks per row (empty: perplexity only)")
    parser.add_argument("--task_limit", type=int, default=500, help="first items of each task")
    parser.add_argument("--task_rows", default=",".join(ORDER), help="comma-separated rows that get task accuracy")
    parser.add_argument("--reuse", action="store_true", help="keep the rows already in --output (same settings) and measure only the rest")
    parser.add_argument("--runs_dir", default=str(ROOT / "runs" / "healing_evidence"))
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "healing_evidence.json"))
    return parser.parse_args()


class Evidence:
    """Evaluates models on fixed blocks and task items and stores every row as soon as it is measured."""

    def __init__(self, args: argparse.Namespace, tokenizer):
        self.args, self.tokenizer, self.rows = args, tokenizer, {}
        self.tasks, self.task_rows = split_names(args.tasks), split_names(args.task_rows)
        self.wiki = EvaluationData(tokenizer, ["wikitext2"], seq_len=args.seq_len, num_samples=args.wiki_samples)
        self.c4 = EvaluationData(tokenizer, ["c4"], seq_len=args.seq_len, num_samples=args.c4_samples)
        self.task_settings: dict | None = None
        if args.reuse and Path(args.output).exists():
            self._reuse(json.loads(Path(args.output).read_text()))

    def _reuse(self, record: dict) -> None:
        """Take over the rows of an earlier run whose measurement settings equal this run's."""
        keys = (
            "num_layers",
            "calibration_samples",
            "heal_steps",
            "batch_size",
            "seq_len",
            "learning_rate",
            "wiki_samples",
            "c4_samples",
            "tasks",
            "task_limit",
        )
        different = [k for k in keys if record["settings"].get(k) != getattr(self.args, k)]
        if different:
            raise SystemExit(f"--reuse: {self.args.output} was measured with other settings ({', '.join(different)})")
        self.rows, self.task_settings = record["rows"], record["settings"].get("tasks_settings")

    def has(self, name: str) -> bool:
        return name in self.rows

    def add(self, name: str, model: torch.nn.Module, **extra) -> None:
        start = time.perf_counter()
        ppl = {**self.wiki.evaluate(model, batch_size=8)["perplexity"], **self.c4.evaluate(model, batch_size=8)["perplexity"]}
        row = {"perplexity": ppl, **model_summary(model), **extra}
        if self.tasks and name in self.task_rows:
            accuracy = evaluate_tasks(model, self.tokenizer, self.tasks, limit=self.args.task_limit, batch_size=16)
            row["tasks"], self.task_settings = accuracy["tasks"], accuracy["settings"]
        self.rows[name] = {**row, "eval_seconds": round(time.perf_counter() - start, 1)}
        print(name, json.dumps(self.rows[name]), flush=True)
        self.save()

    def save(self) -> None:
        settings = dict(vars(self.args))
        settings.update(
            healing_data="wikitext2 validation",
            tasks_settings=self.task_settings,
            eval_data={"wikitext2": "test split, first blocks", "c4": "bundled C4 sample, first blocks"},
        )
        record = {"rows": self.rows, "settings": settings, "versions": package_versions()}
        Path(self.args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(self.args.output).write_text(json.dumps(record, indent=2) + "\n")
        update_section("healing", "healing-evidence", markdown(record))


def markdown(record: dict) -> str:
    """The evidence table: perplexity in and out of domain, task accuracy, healing budget and time."""
    s, rows = record["settings"], record["rows"]
    tasks = split_names(s["tasks"]) if s.get("tasks") else []
    tokens = s["heal_steps"] * s["batch_size"] * s["seq_len"]
    lines = [
        "## Pruned vs dense after equal healing (`benchmarks/healing_evidence.py`)",
        "",
        f"SmolLM2-135M, {s['num_layers']} of 30 layers removed by iterative Block Influence + MagComp "
        f"(calibration {s['calibration_samples']} × {s['seq_len']} WikiText-2 valid blocks, seed 0) or at random "
        "(seed 0, first/last protected, same compensation). Healing budget, the same for every healed row: "
        f"{s['heal_steps']} optimizer steps × {s['batch_size']} blocks × {s['seq_len']} tokens = **{tokens:,} WikiText-2-valid "
        f"tokens** (LoRA r = 2, α = 2, dropout 0.05 on gate/up/down, peak lr {s['learning_rate']:g}, cosine, "
        f"{max(1, s['heal_steps'] // 10)} warm-up steps, seed 0; QLoRA: NF4 + double quantisation, fp32 compute). Evaluation: "
        f"WikiText-2 test, first {s['wiki_samples']} × {s['seq_len']} blocks (in domain); bundled C4 sample, first "
        f"{s['c4_samples']} × {s['seq_len']} blocks (out of domain, never used for healing)"
        + (f"; lm-eval 0-shot on the first {s['task_limit']} items of {', '.join(tasks)} (acc_norm, acc in brackets)." if tasks else "."),
        "",
        "| model | layers | parameters | PPL WikiText-2 | PPL C4 | "
        + "".join(f"{t} acc_norm (acc) | " for t in tasks)
        + "heal tokens | heal s |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(tasks) + "---:|---:|",
    ]
    for name in [n for n in ORDER if n in rows]:
        r = rows[name]
        cells = [f"{r['num_layers']}", f"{r['num_parameters']:,}", f"{r['perplexity']['wikitext2']:.2f}", f"{r['perplexity']['c4']:.2f}"]
        cells += [f"{r['tasks'][t]['acc_norm']:.3f} ({r['tasks'][t]['acc']:.3f})" if "tasks" in r else "-" for t in tasks]
        cells += [f"{r['heal_tokens']:,}" if "heal_tokens" in r else "-", f"{r['heal_seconds']:.0f}" if "heal_seconds" in r else "-"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "BI + LoRA" in rows and "dense + LoRA" in rows:
        ratios = {k: rows["BI + LoRA"]["perplexity"][k] / rows["dense + LoRA"]["perplexity"][k] for k in ("wikitext2", "c4")}
        lines += [
            "",
            f"Pruned / dense perplexity after equal healing (BI + LoRA / dense + LoRA): **{ratios['wikitext2']:.3f}** "
            f"on WikiText-2 test, **{ratios['c4']:.3f}** on C4.",
        ]
    removed = {n: rows[n]["removed_layers"] for n in ("BI-pruned", "random-pruned") if n in rows}
    if removed:
        lines += [
            "",
            "Removed layers (original indices, removal order): "
            + "; ".join(f"{n.split('-')[0]} `{layers}`" for n, layers in removed.items())
            + ".",
        ]
    lines += [
        "",
        f"Command: `OMP_NUM_THREADS=2 .venv/bin/python benchmarks/healing_evidence.py --heal_steps {s['heal_steps']} "
        f"--tasks {s['tasks']} --task_limit {s['task_limit']} --wiki_samples {s['wiki_samples']} --c4_samples {s['c4_samples']}"
        + (f" --task_rows '{s['task_rows']}'" if s.get("task_rows", ",".join(ORDER)) != ",".join(ORDER) else "")
        + "`.",
    ]
    return "\n".join(lines)


def pruned_dir(args, metric: str, selection: str, name: str) -> Path:
    out = Path(args.runs_dir) / name
    if args.reuse and (out / "decisions.json").exists():
        return out
    stage = PruneStage(num_layers=args.num_layers, metric=metric, selection=selection, compensation="magnitude", seed=0)
    prune(
        stage,
        model="demo",
        calibration_samples=args.calibration_samples,
        seed=0,
        seq_len=args.seq_len,
        num_samples=1,
        output_dir=str(out),
        overwrite=True,
    )
    return out


def heal(model_dir: str, *, steps: int, seq_len: int, batch_size: int, learning_rate: float, seed: int, quantize: str | None):
    """A LoRA (or QLoRA) healing fit of ``steps`` optimizer steps on WikiText-2 valid; returns the fitted module."""
    import lightning as L

    from lightning_prune.data.datamodule import TextDataModule
    from lightning_prune.modules.healing import HealingModule

    L.seed_everything(seed, verbose=False)
    module = HealingModule(model=model_dir, learning_rate=learning_rate, warmup_steps=max(1, steps // 10), quantize=quantize)
    data = TextDataModule(tokenizer=model_dir, seq_len=seq_len, num_train_samples=steps * batch_size, batch_size=batch_size, seed=seed)
    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    return module


def add_pruned(evidence: Evidence, name: str, path: Path) -> None:
    if evidence.has(name):
        return
    plan = json.loads((path / "decisions.json").read_text())
    removed = next(d for d in plan["decisions"] if d["kind"] == "prune")["removed_layers"]
    evidence.add(name, load_model(str(path / "model"))[0], removed_layers=removed)


def heal_row(evidence: Evidence, args, name: str, model, quantize: str | None) -> None:
    """Heal with the fixed budget, then evaluate the merged model; records tokens seen and wall time."""
    if evidence.has(name):
        return
    start = time.perf_counter()
    module = heal(
        str(model),
        steps=args.heal_steps,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=0,
        quantize=quantize,
    )
    seconds = round(time.perf_counter() - start, 1)
    evidence.add(name, module.export_model(), heal_tokens=args.heal_steps * args.batch_size * args.seq_len, heal_seconds=seconds)


def main() -> None:
    args = arguments()
    torch.manual_seed(0)
    dense, tokenizer = load_model("demo")
    evidence = Evidence(args, tokenizer)
    if not evidence.has("dense"):
        evidence.add("dense", dense)
    del dense
    bi = pruned_dir(args, "block_influence", "iterative", "bi_pruned")
    add_pruned(evidence, "BI-pruned", bi)
    heal_row(evidence, args, "BI + LoRA", bi / "model", None)
    heal_row(evidence, args, "dense + LoRA", "demo", None)
    random = pruned_dir(args, "random", "one_shot", "random_pruned")
    add_pruned(evidence, "random-pruned", random)
    heal_row(evidence, args, "random + LoRA", random / "model", None)
    if not evidence.has("BI NF4 base (no healing)"):
        base = quantize_model(load_model(str(bi / "model"))[0], quant_type="nf4", compute_dtype="float32", double_quant=True)
        evidence.add("BI NF4 base (no healing)", base.eval())
        del base
    heal_row(evidence, args, "BI + QLoRA", bi / "model", "nf4")
    rows = evidence.rows
    for key in ("wikitext2", "c4"):
        ratio = rows["BI + LoRA"]["perplexity"][key] / rows["dense + LoRA"]["perplexity"][key]
        print(f"{key}: BI+LoRA / dense+LoRA perplexity ratio = {ratio:.3f}")


if __name__ == "__main__":
    main()
