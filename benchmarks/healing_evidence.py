"""Evidence for healing (issue 6): prune 7/30 layers of SmolLM2, heal with LoRA / QLoRA, compare.

Rows, all measured in one run with the same evaluation blocks:
dense; BI-pruned (iterative Block Influence + magnitude compensation); random-pruned (same count,
same compensation); and after the same healing budget: BI + LoRA, BI + QLoRA, random + LoRA, and
the control dense + LoRA (domain adaptation alone). Healing data: WikiText-2 valid; evaluation:
WikiText-2 test (in domain) and C4 (out of domain, never used for healing). Prints the pruned /
dense perplexity ratio after equal healing. Results are written after every stage, so a run cut
short still leaves its measured rows.

Usage: OMP_NUM_THREADS=1 nice -n 10 python benchmarks/healing_evidence.py --bi_pruned runs/healing_evidence/bi_pruned
"""

import argparse
import json
import time
from pathlib import Path

import torch

from lightning_prune.commands.common import EvaluationData
from lightning_prune.commands.demo import heal
from lightning_prune.commands.prune import prune
from lightning_prune.model.loading import load_model
from lightning_prune.results import model_summary, package_versions

ROOT = Path(__file__).resolve().parents[1]


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bi_pruned", default=None, help="directory of an earlier BI prune run (model/ inside); pruned here if absent")
    parser.add_argument("--num_layers", type=int, default=7)
    parser.add_argument("--calibration_samples", type=int, default=16)
    parser.add_argument("--heal_steps", type=int, default=6)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--wiki_samples", type=int, default=32)
    parser.add_argument("--c4_samples", type=int, default=8)
    parser.add_argument("--runs_dir", default=str(ROOT / "runs" / "healing_evidence"))
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "healing_evidence.json"))
    return parser.parse_args()


class Evidence:
    """Evaluates models on fixed blocks and stores every row as soon as it is measured."""

    def __init__(self, args: argparse.Namespace, tokenizer):
        self.args, self.rows = args, {}
        self.wiki = EvaluationData(tokenizer, ["wikitext2"], seq_len=args.seq_len, num_samples=args.wiki_samples)
        self.c4 = EvaluationData(tokenizer, ["c4"], seq_len=args.seq_len, num_samples=args.c4_samples)

    def add(self, name: str, model: torch.nn.Module, **extra) -> None:
        start = time.perf_counter()
        ppl = {**self.wiki.evaluate(model, batch_size=8)["perplexity"], **self.c4.evaluate(model, batch_size=8)["perplexity"]}
        self.rows[name] = {"perplexity": ppl, **model_summary(model), **extra, "eval_seconds": round(time.perf_counter() - start, 1)}
        print(name, json.dumps(self.rows[name]), flush=True)
        self.save()

    def save(self) -> None:
        settings = {k: v for k, v in vars(self.args).items()}
        settings.update(healing_data="wikitext2 validation", eval_data={"wikitext2": "test split, first blocks", "c4": "bundled C4 sample, first blocks"})
        Path(self.args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(self.args.output).write_text(json.dumps({"rows": self.rows, "settings": settings, "versions": package_versions()}, indent=2) + "\n")


def pruned_dir(args, metric: str, selection: str, name: str) -> Path:
    out = Path(args.runs_dir) / name
    prune(model="demo", num_layers=args.num_layers, metric=metric, selection=selection, compensation="magnitude",
          calibration_samples=args.calibration_samples, seed=0, seq_len=args.seq_len, num_samples=1, output_dir=str(out), overwrite=True)
    return out


def add_pruned(evidence: Evidence, name: str, path: Path) -> None:
    decisions = json.loads((path / "decisions.json").read_text())
    evidence.add(name, load_model(str(path / "model"))[0], removed_layers=decisions["removed_layers"])


def heal_row(evidence: Evidence, args, name: str, model, quantize: str | None) -> None:
    """Heal with the fixed budget, then evaluate the merged model; records tokens seen and wall time."""
    start = time.perf_counter()
    module = heal(str(model), output_dir=Path(args.runs_dir) / name.replace(" + ", "_").replace("-", "_"), steps=args.heal_steps,
                  seq_len=args.seq_len, batch_size=args.batch_size, learning_rate=args.learning_rate, seed=0, quantize=quantize)
    seconds = round(time.perf_counter() - start, 1)
    evidence.add(name, module.export_model(), heal_tokens=args.heal_steps * args.batch_size * args.seq_len, heal_seconds=seconds)


def main() -> None:
    args = arguments()
    torch.manual_seed(0)
    dense, tokenizer = load_model("demo")
    evidence = Evidence(args, tokenizer)
    evidence.add("dense", dense)
    del dense
    bi = Path(args.bi_pruned) if args.bi_pruned else pruned_dir(args, "block_influence", "iterative", "bi_pruned")
    add_pruned(evidence, "BI-pruned", bi)
    heal_row(evidence, args, "BI + LoRA", bi / "model", None)
    heal_row(evidence, args, "dense + LoRA", "demo", None)
    random = pruned_dir(args, "random", "one_shot", "random_pruned")
    add_pruned(evidence, "random-pruned", random)
    heal_row(evidence, args, "random + LoRA", random / "model", None)
    heal_row(evidence, args, "BI + QLoRA", bi / "model", "nf4")
    rows = evidence.rows
    for key in ("wikitext2", "c4") if "dense + LoRA" in rows else ():
        ratio = rows["BI + LoRA"]["perplexity"][key] / rows["dense + LoRA"]["perplexity"][key]
        print(f"{key}: BI+LoRA / dense+LoRA perplexity ratio = {ratio:.3f}")


if __name__ == "__main__":
    main()
