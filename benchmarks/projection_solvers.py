"""Projection compensation (GradMAP stage 2, 001 Eq. 10-13) with each solver, on the same removal picks.

SmolLM2-135M (``demo``), 7 of 30 layers removed by iterative Block Influence (the recipes' picks,
scored on ``--score_samples`` WikiText-2-valid blocks, no compensation). On those picks:

- ``none``: plain removal;
- ``adam``: ``PruneStage(compensation="projection", projection_solver="adam")`` (the paper's 200
  Adam steps, λ 1e-3);
- ``closed_form``: the same stage with the default solver (ridge solve in float64, λ chosen on a
  held-out quarter of the calibration tokens);
- ``λ = …``: the exact ridge optimum fitted on all calibration tokens for each λ of the grid
  (``ridge_projection`` on the stage's reconstruction data), folded into the same layer.

Every W' is also scored as a regression on text it was not fitted on: the reconstruction error
‖Y W'ᵀ − R‖² / ‖Y − R‖² (1 = no better than W' = I) on the calibration tokens (in sample) and on the
first WikiText-2 test / C4 test blocks (held out), next to perplexity on those blocks. Calibration
sizes: ``--calibration_samples`` (comma-separated) × ``--seq_len`` WikiText-2-valid blocks; a size
below the hidden size (576) is refused by the closed form and reported as such.

Writes ``benchmarks/results/projection_solvers.json`` and the ``projection-solvers`` section of
``docs/results/pruning.md``::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/projection_solvers.py --calibration_samples 4,128
"""

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from report import ROOT, update_section

from lightning_prune.compensation.projection import (
    REG_GRID,
    fold_projection,
    layer_drift,
    output_means,
    reconstruction_data,
    ridge_projection,
)
from lightning_prune.data.text import load_blocks
from lightning_prune.errors import InputError
from lightning_prune.evaluation.perplexity import perplexity
from lightning_prune.importance import ScoringOptions
from lightning_prune.model.anatomy import Anatomy
from lightning_prune.model.loading import load_model
from lightning_prune.pruning import prune_layers
from lightning_prune.results import package_versions
from lightning_prune.stages import PruneStage

RESULTS = ROOT / "benchmarks" / "results" / "projection_solvers.json"
EVALUATION = ("wikitext2", "c4")


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="model source (a small local directory for a quick check)")
    parser.add_argument("--num_layers", type=int, default=7)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--score_samples", type=int, default=16, help="WikiText-2-valid blocks that score the picks")
    parser.add_argument("--calibration_samples", default="4,128", help="comma-separated calibration sizes (blocks)")
    parser.add_argument("--eval_samples", type=int, default=32, help="evaluation blocks per source")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--output", default=str(RESULTS))
    return parser.parse_args()


def relative_error(projection: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> float:
    """‖Y W'ᵀ − R‖² / ‖Y − R‖²: 1 is no better than the identity, 0 a perfect reconstruction."""
    return float((y @ projection.T - r).pow(2).sum() / (y - r).pow(2).sum())


def down_weight(model, position: int) -> torch.Tensor:
    """The down-projection weight of the layer at ``position``, fp32 (a copy)."""
    anatomy = Anatomy(model)
    return anatomy.part(anatomy.layers[position], "down_proj").weight.detach().float().clone()


class Bench:
    """The dense model, its pruned copy (no compensation) and the blocks every configuration shares."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.dense, self.tokenizer = load_model(args.model)
        self.options = ScoringOptions(batch_size=args.batch_size, progress=False)
        score = self.blocks("wikitext2", "validation", args.score_samples, seed=0)
        pruned = copy.deepcopy(self.dense)
        record = prune_layers(
            pruned, score, metric="block_influence", selection="iterative", num_layers=args.num_layers, options=self.options
        )
        self.picks, self.kept, self.pruned = record["removed_layers"], record["kept_layers"], pruned
        self.evaluation = {name: self.blocks(name, "test", args.eval_samples) for name in EVALUATION}

    def blocks(self, source: str, split: str, count: int, seed: int | None = None) -> torch.Tensor:
        return load_blocks(self.tokenizer, source, split=split, seq_len=self.args.seq_len, num_samples=count, seed=seed)

    def perplexity(self, model) -> dict[str, float]:
        return {
            name: perplexity(model, blocks, batch_size=self.args.batch_size, progress=False) for name, blocks in self.evaluation.items()
        }

    def regression(self, blocks: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(Y, R) of the compensated layer on ``blocks``, from the dense and the uncompensated pruned model."""
        return reconstruction_data(self.dense, self.pruned, blocks, position, self.kept[position], self.options)

    def stage(self, calibration: torch.Tensor, solver: str) -> tuple[dict, torch.Tensor, float]:
        """The package's stage on the picks: (compensation_final record, folded down_proj weight, seconds)."""
        model = copy.deepcopy(self.dense)
        start = time.process_time()
        decision = PruneStage(layers=self.picks, compensation="projection", projection_solver=solver).plan(
            model, calibration, progress=False
        )
        seconds = time.process_time() - start
        return decision.record["compensation_final"], model, seconds


def measure(bench: Bench, samples: int) -> dict:
    """Every solver at one calibration size."""
    calibration = bench.blocks("wikitext2", "validation", samples, seed=1)
    out = {"tokens": calibration.numel(), "rows": {}}
    drift = layer_drift(
        output_means(bench.dense, calibration, bench.options), output_means(bench.pruned, calibration, bench.options), bench.kept
    )
    position = int(drift.argmax())
    out["layer"] = bench.kept[position]
    data = {"calibration": bench.regression(calibration, position)}
    data.update({name: bench.regression(blocks, position) for name, blocks in bench.evaluation.items()})
    down = down_weight(bench.pruned, position)

    def row(model, projection: torch.Tensor | None, **extra) -> dict:
        errors = {name: relative_error(projection, y, r) for name, (y, r) in data.items()} if projection is not None else None
        return {"perplexity": bench.perplexity(model), "relative_error": errors, **extra}

    out["rows"]["none"] = row(bench.pruned, torch.eye(down.shape[0]))
    for solver in ("adam", "closed_form"):
        try:
            final, model, seconds = bench.stage(calibration, solver)
        except InputError as error:
            out["rows"][solver] = {"refused": str(error)}
            continue
        folded = down_weight(model, position)
        projection = torch.linalg.lstsq(down.T.double(), folded.T.double()).solution.T.float()  # W' from Ŵ = W' W
        out["rows"][solver] = row(model, projection, reg=final["reg"], seconds=round(seconds, 1), layer=final["layer"])
    y, r = data["calibration"]
    if y.shape[0] >= y.shape[1]:
        for reg in REG_GRID:
            projection = ridge_projection(y, r, reg).float()
            model = copy.deepcopy(bench.pruned)
            fold_projection(model, position, projection)
            out["rows"][f"lambda={reg:g}"] = row(model, projection, reg=reg)
    return out


def markdown(record: dict) -> str:
    s = record["settings"]
    lines = [
        "## Projection compensation: none / Adam / closed form on the same picks (`benchmarks/projection_solvers.py`)",
        "",
        f"SmolLM2-135M (`{s['model']}`), {s['num_layers']} of 30 layers removed by iterative BI (picks `{record['picks']}`, scored on "
        f"{s['score_samples']} × {s['seq_len']} WikiText-2-valid blocks). Projection compensation fits W' for the retained layer "
        f"with the largest output drift on the calibration blocks (WikiText-2 valid, another draw). Perplexity on the first "
        f"{s['eval_samples']} × {s['seq_len']} blocks of WikiText-2 test and C4 test. Relative error = ‖Y W'ᵀ − R‖² / ‖Y − R‖² "
        "of the layer's output reconstruction (1 = no better than leaving the layer as it is) on the calibration tokens "
        "(in sample) and on the evaluation blocks (held out). `adam` / `closed_form` are `PruneStage(compensation=projection, "
        "projection_solver=…)`; `λ = …` rows are the exact ridge optimum on all calibration tokens for that λ. CPU s: process "
        "time of the stage (two threads).",
    ]
    for samples, size in record["sizes"].items():
        lines += [
            "",
            f"### {samples} calibration blocks = {size['tokens']:,} tokens (compensated layer {size['layer']})",
            "",
            "| W' | λ | PPL WikiText-2 | PPL C4 | rel. error calibration | rel. error WikiText-2 | rel. error C4 | CPU s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in size["rows"].items():
            if "refused" in r:
                lines.append(f"| {name} | | refused: {r['refused']} | | | | | |")
                continue
            errors = r["relative_error"] or {}
            cells = [name, f"{r['reg']:g}" if "reg" in r else "-"]
            cells += [f"{r['perplexity'][k]:.2f}" for k in EVALUATION]
            cells += [f"{errors[k]:.3f}" if k in errors else "-" for k in ("calibration", *EVALUATION)]
            cells += [f"{r['seconds']:.0f}" if "seconds" in r else "-"]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Command: `OMP_NUM_THREADS=2 .venv/bin/python benchmarks/projection_solvers.py --calibration_samples {s['calibration_samples']}`.",
    ]
    return "\n".join(lines)


def main() -> None:
    args = arguments()
    bench = Bench(args)
    record = {"settings": vars(args), "picks": bench.picks, "sizes": {}}
    for samples in [int(x) for x in args.calibration_samples.split(",") if x.strip()]:
        record["sizes"][str(samples)] = measure(bench, samples)
        record["versions"] = package_versions()
        Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
        print(json.dumps(record["sizes"][str(samples)], indent=1), flush=True)
    if args.output == str(RESULTS):
        update_section("pruning", "projection-solvers", markdown(record))


if __name__ == "__main__":
    main()
