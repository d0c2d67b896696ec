"""Evidence for the ``distill_gap`` stage: magnitude compensation alone vs compensation + gap distillation.

SmolLM2-135M (``demo``), the 7 layers that iterative Block Influence with magnitude compensation
removes in ``benchmarks/repair_evidence.py`` (given explicitly here, so the scoring is not rerun),
magnitude compensation folded in (fitted on the recipes' 16 calibration blocks); then
``GapDistillStage`` with each setting of ``VARIANTS`` on WikiText-2-valid calibration blocks (seed 0,
as the recipes draw them; 16 blocks as in the recipes, or 64). No LoRA. Every row is
measured on the first ``--eval_samples`` x 128 blocks of WikiText-2 test (in domain) and of the
bundled C4 sample (out of domain, used for nothing else). The JSON
(``benchmarks/results/gap_distill_evidence.json``) and the ``gap-distill-evidence`` section of
``docs/results/healing.md`` are rewritten after every row.

Usage: OMP_NUM_THREADS=2 python benchmarks/gap_distill_evidence.py [--eval_samples 32] [--variants a,b]
"""

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from report import ROOT, update_section

REMOVED = [14, 17, 13, 15, 12, 25, 16]  # repair_evidence.json, bi_lora / bi_distill: iterative BI + magnitude compensation
VARIANTS = {  # key -> (GapDistillStage settings, calibration blocks)
    "after1_lr1e-4": ({"layers_after": 1, "lr": 1e-4, "steps": 100}, 16),
    "after1_lr3e-4": ({"layers_after": 1, "lr": 3e-4, "steps": 100}, 16),
    "after1_lr1e-3": ({"layers_after": 1, "lr": 1e-3, "steps": 100}, 16),
    "around_lr1e-4": ({"layers_after": 1, "layers_before": 1, "lr": 1e-4, "steps": 100}, 16),
    "after1_lr1e-4_cal64": ({"layers_after": 1, "lr": 1e-4, "steps": 200}, 64),
    # the other distillation losses at the default settings (mse_norm: after1_lr1e-3)
    "after1_lr1e-3_kl_norm": ({"layers_after": 1, "lr": 1e-3, "steps": 100, "loss": "kl_norm"}, 16),
    "after1_lr1e-3_cosine": ({"layers_after": 1, "lr": 1e-3, "steps": 100, "loss": "cosine"}, 16),
    "after1_lr1e-3_kl_raw": ({"layers_after": 1, "lr": 1e-3, "steps": 100, "loss": "kl_raw"}, 16),
}


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval_samples", type=int, default=32)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "gap_distill_evidence.json"))
    return parser.parse_args()


def markdown(record: dict) -> str:
    s = record["settings"]
    lines = [
        "## Gap distillation vs compensation alone (`benchmarks/gap_distill_evidence.py`)",
        "",
        f"SmolLM2-135M (`demo`), layers {s['removed']} removed (the iterative Block Influence picks of the repair evidence) with "
        "magnitude compensation folded in, then `distill_gap` (loss `mse_norm` unless the settings name another, batch 2 "
        "blocks, AdamW, cosine decay) on "
        "WikiText-2-valid calibration blocks of 128 tokens (seed 0); no LoRA. Evaluation: the first "
        f"{s['eval_samples']} × 128 blocks of WikiText-2 test (in domain) and of the bundled C4 sample (out of domain). "
        "Gap loss = the row's loss (mean over the calibration blocks) before → after training, summed over the windows; losses "
        "of different kinds are not comparable with each other, the perplexities are (a deeper "
        "window's before is taken after the shallower windows trained, so it differs between rows). Stage s = the gap stage "
        "(teacher capture + training) or the compensation, in wall seconds on a 2-core CPU: the rows of the lr / window / "
        "calibration variants ran beside other jobs (load ≈ 7), the dense, compensation and loss rows on an idle machine.",
        "",
        "| row | calibration tokens | settings | trained layers | gap loss | stage s | PPL WikiText-2 | PPL C4 |",
        "|---|---:|---|---|---|---:|---:|---:|",
    ]
    for key, row in record["rows"].items():
        loss = f"{row['loss_before']:.4f} → {row['loss_after']:.4f}" if row.get("loss_before") is not None else "-"
        lines.append(
            f"| {key} | {row['calibration_tokens']:,} | {row['settings'] or '-'} | {row['trained'] or '-'} | {loss} | "
            f"{row['seconds']:.0f} | {row['perplexity']['wikitext2']:.2f} | {row['perplexity']['c4']:.2f} |"
        )
    lines += [
        "",
        "Reproduce: `OMP_NUM_THREADS=2 .venv/bin/python benchmarks/gap_distill_evidence.py "
        f"--eval_samples {s['eval_samples']} --variants {','.join(k for k in record['rows'] if k not in ('dense', 'compensation'))}`.",
    ]
    return "\n".join(lines)


def main() -> None:
    args = arguments()
    from lightning_prune.data.datamodule import TextDataModule
    from lightning_prune.evaluation.suite import EvaluationSuite
    from lightning_prune.model.loading import load_model
    from lightning_prune.results import package_versions
    from lightning_prune.stages import GapDistillStage, PruneStage

    torch.manual_seed(0)
    dense, tokenizer = load_model("demo")
    suite = EvaluationSuite(data="wikitext2,c4", seq_len=128, num_samples=args.eval_samples)
    calibration = {n: TextDataModule(tokenizer="demo", seq_len=128, calibration_samples=n).calibration_blocks() for n in (16, 64)}
    record = {"settings": {"removed": REMOVED, "eval_samples": args.eval_samples}, "rows": {}}
    previous = json.loads(Path(args.output).read_text()) if Path(args.output).exists() else {}
    if previous.get("settings") == record["settings"]:  # rows of variants not rerun now are kept
        record["rows"] = previous["rows"]

    def measure(key: str, model, started: float, calibration_tokens: int, **extra) -> None:
        seconds = time.perf_counter() - started
        values = suite.evaluate(model, tokenizer, progress=False)
        record["rows"][key] = {"perplexity": values["perplexity"], "seconds": seconds, "calibration_tokens": calibration_tokens, **extra}
        record["versions"] = package_versions()
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
        update_section("healing", "gap-distill-evidence", markdown(record))
        print(key, values["perplexity"], f"{seconds:.0f} s", flush=True)

    measure("dense", dense, time.perf_counter(), 0, settings=None, trained=None)
    pruned, started = copy.deepcopy(dense), time.perf_counter()
    prune_decision = PruneStage(layers=REMOVED, compensation="magnitude").plan(pruned, calibration[16], progress=False)
    measure("compensation", pruned, started, 16 * 128, settings="magnitude compensation only (16 blocks)", trained=None)
    for key in args.variants.split(","):
        settings, blocks = VARIANTS[key]
        stage, model, started = GapDistillStage(**settings), copy.deepcopy(pruned), time.perf_counter()
        stage.observe(dense, calibration[blocks])
        stage.follow([prune_decision])
        decision = stage.plan(model, calibration[blocks], progress=False)
        windows = decision.record["windows"]
        measure(
            key,
            model,
            started,
            blocks * 128,
            settings=", ".join(f"{k} {v}" for k, v in settings.items()),
            trained=str([list(range(w["start"], w["end"])) for w in windows]),
            loss_before=sum(w["loss_before"] for w in windows),
            loss_after=sum(w["loss_after"] for w in windows),
        )


if __name__ == "__main__":
    main()
