"""Perplexity after removing 7 of 30 SmolLM2 layers: metric × selection × compensation.

For every metric: one-shot picks (scored once, shared by the three compensations) and
iterative picks (IterPrune; re-scored after each removal — with ``magnitude`` compensation the
scores are taken on the compensated model, as Prune&Comp does; ``projection`` acts after the
last removal, so it reuses the uncompensated iterative picks). ``contiguous`` uses its own block
selection. Results go to ``benchmarks/results/pruning_evidence.json`` (rewritten after every
configuration) and a table in ``docs/results/pruning.md``::

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/pruning_evidence.py \\
        --calibration_samples 4 --eval_samples 16
"""

import argparse
import copy
import json
import time

from report import ROOT, remove_section, update_section

from lightning_prune.data.text import load_blocks
from lightning_prune.evaluation.perplexity import perplexity
from lightning_prune.importance import ScoringOptions, score_layers
from lightning_prune.model.loading import load_model
from lightning_prune.pruning import prune_layers, resolve_protection
from lightning_prune.results import package_versions
from lightning_prune.selection import contiguous_block, one_shot, protected_positions

RESULTS = ROOT / "benchmarks" / "results" / "pruning_evidence.json"
COMPENSATIONS = ("none", "magnitude", "projection")
GRID = {
    "magnitude": ("one_shot", "iterative"),
    "random": ("one_shot", "iterative"),
    "block_influence": ("one_shot", "iterative"),
    "contiguous": ("contiguous",),
    "taylor": ("one_shot", "iterative"),
    "gradient": ("one_shot", "iterative"),
    "removal_perplexity": ("one_shot", "iterative"),
    "accuracy": ("one_shot", "iterative"),
}


class Grid:
    """Runs configurations on copies of the base model and records them as they finish."""

    def __init__(self, base, blocks, accuracy_blocks, evaluation, args):
        self.base, self.blocks, self.accuracy_blocks, self.evaluation, self.args = base, blocks, accuracy_blocks, evaluation, args
        self.rows: list[dict] = []
        self.record = {
            "settings": {**vars(args), "calibration": "wikitext2 validation (seeded draw)", "evaluation": "wikitext2 test (first blocks)"}
        }

    def data(self, metric):
        return self.accuracy_blocks if metric == "accuracy" else self.blocks

    def options(self) -> ScoringOptions:
        return ScoringOptions(batch_size=self.args.batch_size, seed=self.args.seed, progress=False)

    def evaluate(self, model) -> float:
        return perplexity(model, self.evaluation, batch_size=self.args.batch_size, progress=False)

    def run(self, name: str, mode: str, compensation: str, **kwargs) -> list[int]:
        """Prune a copy of the base model (``kwargs`` go to ``prune_layers``), evaluate it, record a row."""
        model = copy.deepcopy(self.base)
        start = time.perf_counter()
        decisions = prune_layers(
            model, self.data(name), compensation=compensation, calibration_blocks=self.blocks, options=self.options(), **kwargs
        )
        seconds = time.perf_counter() - start
        row = {
            "metric": name,
            "selection": mode,
            "compensation": compensation,
            "removed": decisions["removed_layers"],
            "perplexity": self.evaluate(model),
            "seconds": seconds,
        }
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.save()
        return decisions["removed_layers"]

    def one_shot_picks(self, metric, selection) -> tuple[list[int], float]:
        first, last = resolve_protection(metric, None, None)
        protected = protected_positions(30, first, last)
        options = self.options()
        options.candidates = [p for p in range(30) if p not in protected]
        options.block_size = self.args.num_layers
        start = time.perf_counter()
        scores = score_layers(self.base, self.data(metric), metric, options)
        picks = (
            contiguous_block(scores, self.args.num_layers, protected, by_start=metric == "contiguous")
            if selection == "contiguous"
            else one_shot(scores, self.args.num_layers, protected)
        )
        return picks, time.perf_counter() - start

    def metric(self, metric: str) -> None:
        for selection in GRID[metric]:
            if selection == "iterative":
                picks = None
                for compensation in ("none", "magnitude"):
                    removed = self.run(
                        metric, selection, compensation, metric=metric, selection="iterative", num_layers=self.args.num_layers
                    )
                    picks = picks or removed
                self.run(metric, selection, "projection", layers=picks)
                continue
            picks, seconds = self.one_shot_picks(metric, selection)
            for compensation in COMPENSATIONS:
                self.run(metric, selection, compensation, layers=picks)
                self.rows[-1]["scoring_seconds"] = seconds

    def save(self) -> None:
        tag = f"_{self.args.tag}" if self.args.tag else ""
        path = RESULTS.with_name(f"{RESULTS.stem}{tag}.json")
        path.write_text(json.dumps({**self.record, "rows": self.rows, "versions": package_versions()}, indent=2) + "\n")
        update_section("pruning", f"pruning-evidence{tag.replace('_', '-')}", markdown(self.record, self.rows))


def markdown(record: dict, rows: list[dict]) -> str:
    settings = record["settings"]
    reduced = settings["calibration_samples"] < 64 or settings["eval_samples"] < 64
    lines = [
        f"## Perplexity after removing {settings['num_layers']} of 30 layers, calibration {settings['calibration_samples']}×"
        f"{settings['seq_len']}, evaluation {settings['eval_samples']}×{settings['seq_len']} (`benchmarks/pruning_evidence.py`)",
        "",
        f"SmolLM2-135M (fp32). Calibration: WikiText-2 validation {settings['calibration_samples']}×{settings['seq_len']} tokens "
        f"(accuracy metric: {settings['accuracy_samples']}×{settings['accuracy_seq_len']}, last-token top-1, r = 0); evaluation: "
        f"WikiText-2 test {settings['eval_samples']}×{settings['seq_len']} tokens. Dense perplexity on this evaluation: "
        f"**{record.get('dense_perplexity', float('nan')):.2f}**. Protection: first 4 / last 2 for magnitude and taylor (Mag+/Taylor+), "
        "else first 1 / last 1."
        + (" Sizes are reduced from the issue's 64×128 / 64×128 to fit a shared 2-core CPU." if reduced else " The issue's sizes."),
        "",
        "Columns none / magnitude / projection: perplexity after pruning with that compensation; *select s*: seconds to",
        "choose the 7 layers without compensation (one-shot: one scoring; iterative: 7 scorings + removals).",
        "",
        "| metric | selection | none | magnitude (MagComp) | projection (GradMAP) | select s | removed (none; removal order) |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    table: dict[tuple, dict] = {}
    for row in rows:
        table.setdefault((row["metric"], row["selection"]), {})[row["compensation"]] = row
    for (metric, selection), by_comp in table.items():
        cells = [f"{by_comp[c]['perplexity']:.2f}" if c in by_comp else "–" for c in COMPENSATIONS]
        plain = by_comp.get("none", next(iter(by_comp.values())))
        seconds = plain.get("scoring_seconds", plain["seconds"])
        lines.append(f"| {metric} | {selection} | {' | '.join(cells)} | {seconds:.1f} | {plain['removed']} |")
    return "\n".join(lines)


def merge(tags: list[str]) -> None:
    """Fold the rows of tagged runs (same settings, other processes) into the main results and table."""
    record = json.loads(RESULTS.read_text())
    for tag in tags:
        tagged = json.loads(RESULTS.with_name(f"{RESULTS.stem}_{tag}.json").read_text())
        metrics = {row["metric"] for row in tagged["rows"]}
        record["rows"] = [row for row in record["rows"] if row["metric"] not in metrics] + tagged["rows"]
        record.setdefault("merged_from", []).append(f"{RESULTS.stem}_{tag}.json")
        remove_section("pruning", f"pruning-evidence-{tag}")
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    update_section("pruning", "pruning-evidence", markdown(record, record["rows"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics", default=",".join(GRID))
    parser.add_argument("--num_layers", type=int, default=7)
    parser.add_argument("--calibration_samples", type=int, default=64)
    parser.add_argument("--accuracy_samples", type=int, default=64)
    parser.add_argument("--accuracy_seq_len", type=int, default=32)
    parser.add_argument("--eval_samples", type=int, default=64)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip_iterative", default="", help="comma-separated metrics whose iterative runs are skipped")
    parser.add_argument("--tag", default="", help="suffix of the results file and markdown section (runs split over processes)")
    parser.add_argument("--merge", default="", help="only merge the results of these comma-separated tags into the main table")
    parser.add_argument("--render_only", action="store_true", help="only re-render the main table from its JSON")
    args = parser.parse_args()
    if args.merge or args.render_only:
        merge([tag for tag in args.merge.split(",") if tag])
        return
    base, tokenizer = load_model("demo")
    blocks = load_blocks(
        tokenizer, "wikitext2", split="validation", seq_len=args.seq_len, num_samples=args.calibration_samples, seed=args.seed
    )
    accuracy_blocks = load_blocks(
        tokenizer, "wikitext2", split="validation", seq_len=args.accuracy_seq_len, num_samples=args.accuracy_samples, seed=args.seed + 1
    )
    evaluation = load_blocks(tokenizer, "wikitext2", split="test", seq_len=args.seq_len, num_samples=args.eval_samples)
    grid = Grid(base, blocks, accuracy_blocks, evaluation, args)
    grid.record["dense_perplexity"] = grid.evaluate(base)
    print("dense", grid.record["dense_perplexity"], flush=True)
    skipped = set(args.skip_iterative.split(",")) - {""}
    for metric in args.metrics.split(","):
        if metric in skipped:
            GRID[metric] = tuple(s for s in GRID[metric] if s != "iterative")
        grid.metric(metric)
    grid.save()


if __name__ == "__main__":
    main()
