"""Which CoMe settings beat direct layer removal? SmolLM2-135M, 30 -> 23 layers, no training.

Every row removes 7 of the 30 layers of the same model, calibrated on the same WikiText-2
validation blocks (seed 0), and is measured on the same WikiText-2 test and C4 held-out
blocks (bundled data only). Rows: BI removal (one-shot and iterative, ShortGPT / paper 004's
baseline), CoMe with the paper's LLaMA-2 setting (p = 1, rho = 0, re-merging; App. B, spec
(h)), minimum retention rho in {0.9, 0.97} with and without re-merging, the merged-norm rules
(``norm_rule`` mean / weighted / dominant, spec (d)), attention-only and FFN-only
concatenation (``parts``), removal of the lower-BI layer of each CoMe window (p = inf with
dominant norms), CoMe-P (Alg. 2) and the sum-merge baseline. Each row records its settings,
both perplexities, seconds, and its ratio to BI one-shot removal measured with the same data.

Results go to ``benchmarks/results/merging_ablation.json`` after every row (``--reuse`` skips
rows already there with the same data settings) and a table in ``docs/results/merging.md``::

    OMP_NUM_THREADS=2 nice -n 10 /work/main/.venv/bin/python benchmarks/merging_ablation.py --reuse
"""

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from report import ROOT, update_section

from lightning_prune.data.text import load_blocks
from lightning_prune.evaluation.suite import EvaluationData
from lightning_prune.importance import ScoringOptions
from lightning_prune.merging import merge_model, posterior_ratios, progressive_merge
from lightning_prune.model.loading import load_model
from lightning_prune.pruning import prune_layers
from lightning_prune.results import package_versions

RESULTS = ROOT / "benchmarks" / "results" / "merging_ablation.json"
PAPER = dict(method="come", p=1.0, rho=0.0, remerge=True, norm_rule="mean", parts="both")
ROWS = {
    "dense": dict(kind="dense"),
    "bi_one_shot": dict(kind="prune", selection="one_shot"),
    "bi_iterative": dict(kind="prune", selection="iterative"),
    "come_paper": dict(kind="merge", **PAPER),
    "come_dominant": dict(kind="merge", **{**PAPER, "norm_rule": "dominant"}),
    "come_weighted": dict(kind="merge", **{**PAPER, "norm_rule": "weighted"}),
    "come_rho0.97_noremerge": dict(kind="merge", **{**PAPER, "rho": 0.97, "remerge": False}),
    "come_rho0.97_noremerge_dominant": dict(kind="merge", **{**PAPER, "rho": 0.97, "remerge": False, "norm_rule": "dominant"}),
    "come_rho0.97": dict(kind="merge", **{**PAPER, "rho": 0.97}),
    "come_rho0.97_dominant": dict(kind="merge", **{**PAPER, "rho": 0.97, "norm_rule": "dominant"}),
    "come_rho0.9_noremerge": dict(kind="merge", **{**PAPER, "rho": 0.9, "remerge": False}),
    "come_rho0.9_noremerge_dominant": dict(kind="merge", **{**PAPER, "rho": 0.9, "remerge": False, "norm_rule": "dominant"}),
    "come_rho0.9": dict(kind="merge", **{**PAPER, "rho": 0.9}),
    "come_noremerge": dict(kind="merge", **{**PAPER, "remerge": False}),
    "come_attention_only": dict(kind="merge", **{**PAPER, "parts": "attention"}),
    "come_ffn_only": dict(kind="merge", **{**PAPER, "parts": "ffn"}),
    "window_removal": dict(kind="merge", **{**PAPER, "p": math.inf, "norm_rule": "dominant"}),
    "sum": dict(kind="merge", **{**PAPER, "method": "sum"}),
    "come_p": dict(kind="merge", **{**PAPER, "method": "come_p"}),
    "come_p_dominant": dict(kind="merge", **{**PAPER, "method": "come_p", "norm_rule": "dominant"}),
}
LABELS = {
    "dense": "dense (30 layers)",
    "bi_one_shot": "BI removal, one-shot (ShortGPT)",
    "bi_iterative": "BI removal, iterative",
    "window_removal": "drop lower-BI layer of each CoMe window (p = inf, dominant norms)",
    "sum": "sum-merge (weight average, CoMe ratios)",
    "come_p": "CoMe-P",
    "come_p_dominant": "CoMe-P, dominant norms",
}
DATA_SETTINGS = ("model", "num_layers", "seq_len", "eval_samples", "calibration_samples", "grid", "grid_samples", "batch_size")


class Ablation:
    """Runs rows on copies of the base model and writes each one as it finishes."""

    def __init__(self, model, tokenizer, args):
        self.model, self.args = model, args
        self.target = model.config.num_hidden_layers - args.num_layers
        self.calibration = load_blocks(
            tokenizer, "wikitext2", split="validation", seq_len=args.seq_len, num_samples=args.calibration_samples, seed=0
        )
        self.evaluation = EvaluationData(tokenizer, ["wikitext2", "c4"], seq_len=args.seq_len, num_samples=args.eval_samples)
        self.results = load_results(args)

    def batches(self) -> list[torch.Tensor]:
        return list(self.calibration.split(self.args.batch_size))

    def run(self, key: str) -> None:
        """Build the row's model, time it, evaluate it, store it (with its ratio to BI one-shot)."""
        settings = ROWS[key]
        model = copy.deepcopy(self.model)
        start = time.perf_counter()
        details = self.build(model, settings)
        built = time.perf_counter() - start
        scores = self.evaluation.evaluate(model, batch_size=self.args.batch_size, progress=False)
        row = {
            "settings": readable(settings),
            "perplexity": scores["perplexity"],
            "num_layers": scores["num_layers"],
            "build_seconds": round(built, 1),
            "eval_seconds": round(time.perf_counter() - start - built, 1),
            **details,
        }
        self.results["rows"][key] = row
        add_ratios(self.results["rows"])
        save(self.results, self.args.output)
        print(key, json.dumps({k: row[k] for k in ("perplexity", "build_seconds")}), flush=True)

    def build(self, model, settings: dict) -> dict:
        """Change ``model`` in place as the row says; return what to record about the result."""
        if settings["kind"] == "dense":
            return {}
        if settings["kind"] == "prune":
            options = ScoringOptions(batch_size=self.args.batch_size, progress=False)
            record = prune_layers(
                model,
                self.calibration,
                metric="block_influence",
                selection=settings["selection"],
                num_layers=self.args.num_layers,
                options=options,
            )
            return {"removed": record["removed_layers"], "protected": record["protected_layers"]}
        record = self.merge(model, {k: v for k, v in settings.items() if k != "kind"})
        return {"groups": record.groups, "ratios": [step["ratios"] for step in record.steps]}

    def merge(self, model, options: dict):
        """``merge_model``, except CoMe-P scores its grid on the first ``grid_samples`` blocks only."""
        if options["method"] != "come_p":
            return merge_model(model, self.batches(), self.target, **options, grid=self.args.grid, progress=False)
        norm = {"norm_rule": options["norm_rule"], "parts": options["parts"]}
        rule = posterior_ratios([self.calibration[: self.args.grid_samples]], self.args.grid, **norm, progress=False)
        return progressive_merge(model, self.batches(), self.target, ratio_rule=rule, remerge=options["remerge"], **norm, progress=False)


def readable(settings: dict) -> dict:
    """Settings with ``inf`` as a string (strict JSON)."""
    return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in settings.items()}


def add_ratios(rows: dict) -> None:
    """Each row's perplexity divided by BI one-shot removal's, per source (same data, same run settings)."""
    reference = rows.get("bi_one_shot")
    for row in rows.values():
        if reference is not None:
            row["ratio_to_bi"] = {k: round(v / reference["perplexity"][k], 4) for k, v in row["perplexity"].items()}


def data_settings(args) -> dict:
    return {name: getattr(args, name) for name in DATA_SETTINGS}


def load_results(args) -> dict:
    """Stored results when ``--reuse`` and their data settings match; otherwise a fresh record."""
    fresh = {"settings": {}, "rows": {}}
    stored = json.loads(args.output.read_text()) if args.output.exists() else fresh
    if not args.reuse or stored["settings"].get("data") != data_settings(args):
        stored = fresh
    stored["settings"] = {
        "data": data_settings(args),
        "model": "SmolLM2-135M (demo, fp32)" if args.model == "demo" else args.model,
        "threads": torch.get_num_threads(),
        "calibration": f"{args.calibration_samples} x {args.seq_len} WikiText-2 validation blocks (seed 0)",
        "evaluation": f"first {args.eval_samples} x {args.seq_len} tokens of WikiText-2 test and C4 held-out (bundled)",
        "versions": package_versions(),
    }
    return stored


def save(results: dict, path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def label(key: str, settings: dict) -> str:
    """Row name: fixed labels for baselines, the CoMe settings spelled out otherwise."""
    if key in LABELS:
        return LABELS[key]
    parts = [f"p = {settings['p']:g}", f"rho = {settings['rho']:g}", "remerge" if settings["remerge"] else "no remerge"]
    parts.append(f"{settings['norm_rule']} norms")
    if settings["parts"] != "both":
        parts.append(f"{settings['parts']} only")
    return "CoMe, " + ", ".join(parts) + (" (paper, LLaMA-2)" if key == "come_paper" else "")


def report(results: dict, command: str) -> str:
    """Markdown table of every finished row in ``ROWS`` order."""
    settings, rows = results["settings"], results["rows"]
    lines = [
        "## Ablation: which CoMe settings beat removal? SmolLM2-135M, 30 -> 23 layers, no training (benchmarks/merging_ablation.py)",
        "",
        f"Calibration: {settings['calibration']}; CoMe-P grid n = {settings['data']['grid']} scored on the first "
        f"{settings['data']['grid_samples']} of them. Evaluation: {settings['evaluation']}. CPU, {settings['threads']} thread(s). "
        "Ratio = perplexity / BI one-shot removal's on the same blocks (< 1: better than removal).",
        "",
        f"Command: `{command}`",
        "",
        "| method | WikiText-2 PPL | C4 PPL | ratio WikiText-2 | ratio C4 | seconds (build + eval) |",
        "|---|---|---|---|---|---|",
    ]
    for key in [k for k in ROWS if k in rows]:
        row = rows[key]
        ppl, ratio = row["perplexity"], row.get("ratio_to_bi", {})
        lines.append(
            f"| {label(key, ROWS[key])} | {ppl['wikitext2']:.1f} | {ppl['c4']:.1f} | {ratio.get('wikitext2', float('nan')):.3f} | "
            f"{ratio.get('c4', float('nan')):.3f} | {row['build_seconds']:.0f} + {row['eval_seconds']:.0f} |"
        )
    missing = [key for key in ROWS if key not in rows]
    if missing:
        lines += ["", f"Not measured yet (run them with `--reuse --rows {','.join(missing)}`): {', '.join(missing)}."]
    return "\n".join(lines)


COMMAND = "OMP_NUM_THREADS=2 nice -n 10 .venv/bin/python benchmarks/merging_ablation.py --reuse"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows from: {', '.join(ROWS)}")
    parser.add_argument("--model", default="demo", help="demo (SmolLM2-135M) or a local model directory (smoke tests)")
    parser.add_argument("--num_layers", type=int, default=7, help="layers removed (30 -> 23 for the demo model)")
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--eval_samples", type=int, default=32)
    parser.add_argument("--calibration_samples", type=int, default=32)
    parser.add_argument("--grid", type=int, default=20, help="CoMe-P grid size n (n + 1 candidates)")
    parser.add_argument("--grid_samples", type=int, default=4, help="calibration blocks scoring each CoMe-P candidate")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--output", type=Path, default=RESULTS, help="results JSON (docs are updated only for the default)")
    parser.add_argument("--reuse", action="store_true", help="keep stored rows with the same data settings; run only missing rows")
    parser.add_argument("--report", action="store_true", help="only rewrite the docs table from the stored JSON")
    args = parser.parse_args()
    unknown = [key for key in args.rows.split(",") if key not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    if args.report:
        update_section("merging", "merging-ablation", report(json.loads(args.output.read_text()), COMMAND))
        return
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    ablation = Ablation(model, tokenizer, args)
    for key in ["bi_one_shot", *[k for k in args.rows.split(",") if k != "bi_one_shot"]]:
        if key not in ablation.results["rows"]:
            ablation.run(key)
    if args.output == RESULTS:
        update_section("merging", "merging-ablation", report(ablation.results, COMMAND))
    else:
        print(report(ablation.results, COMMAND))


if __name__ == "__main__":
    main()
