"""Evidence for CoMe (paper 004) on SmolLM2-135M: 30 -> 23 layers, WikiText-2 test perplexity.

Stages (each appends to ``benchmarks/results/merging_evidence.json`` as soon as it finishes,
so a partial run still leaves its numbers):

- ``training-free``: dense, BI one-shot removal, sum-merge, CoMe, CoMe-P (no training);
- ``distill``: CoMe followed by CoMe-sp, CoMe-mp (student path) and CoMe-mp (teacher-forced)
  through ``Trainer.fit`` with :class:`LayerwiseDistillation`, each with the stated budget.

Run: ``OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/merging_evidence.py --stages training-free,distill``.
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import lightning as L
import torch

from lightning_prune.data.datamodule import TextDataModule
from lightning_prune.data.text import load_blocks
from lightning_prune.evaluation.perplexity import perplexity
from lightning_prune.merging import calibration_statistics, merge_model, rebuild_merged_architecture
from lightning_prune.merging.posterior import posterior_ratios
from lightning_prune.merging.progressive import progressive_merge
from lightning_prune.model.loading import load_model
from lightning_prune.model.surgery import remove_layers
from lightning_prune.modules.distillation import LayerwiseDistillation
from lightning_prune.results import package_versions

sys.path.insert(0, str(Path(__file__).parent))
from report import update_section  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "merging_evidence.json"


def record(results: dict, key: str, value: dict) -> None:
    """Add one finished stage to ``results`` and to the JSON file (merged with what is there)."""
    results[key] = value
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    stored = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.write_text(json.dumps({**stored, **results}, indent=2) + "\n")
    print(key, json.dumps(value), flush=True)


def timed_merge(model, calibration, args, method: str, **options) -> tuple[dict, dict]:
    start = time.perf_counter()
    merged = copy.deepcopy(model)
    merge = merge_model(merged, calibration, 30 - args.num_layers, method=method, p=1.0, rho=0.0, progress=False, **options)
    return merged, {"groups": merge.groups, "steps": merge.steps, "merge_seconds": round(time.perf_counter() - start, 1)}


def training_free(model, tokenizer, evaluation, args, results: dict) -> None:
    blocks = load_blocks(tokenizer, "wikitext2", split="validation", seq_len=args.seq_len, num_samples=args.calibration_samples, seed=0)
    calibration = list(blocks.split(8))
    record(results, "dense", {"perplexity": perplexity(model, evaluation, progress=False), "num_layers": 30})
    stats = calibration_statistics(model, calibration, progress=False)
    removed = sorted(stats.block_influence.argsort()[: args.num_layers].tolist())
    pruned = copy.deepcopy(model)
    remove_layers(pruned, removed)
    record(results, "bi_removal", {"perplexity": perplexity(pruned, evaluation, progress=False), "removed": removed, "num_layers": 23})
    del pruned
    for name, method, options in (("sum_merge", "sum", {}), ("come", "come", {})):
        merged, info = timed_merge(model, calibration, args, method, **options)
        record(results, name, {"perplexity": perplexity(merged, evaluation, progress=False), **info})
        if name == "come":
            torch.save({"groups": info["groups"], "state": merged.state_dict()}, args.work / "come.pt")
    grid_calibration = [blocks[: args.grid_samples]]
    start = time.perf_counter()
    merged = copy.deepcopy(model)
    merge = progressive_merge(
        merged, calibration, 30 - args.num_layers, ratio_rule=posterior_ratios(grid_calibration, 20, progress=False), progress=False
    )
    record(
        results,
        "come_p",
        {
            "perplexity": perplexity(merged, evaluation, progress=False),
            "groups": merge.groups,
            "steps": merge.steps,
            "merge_seconds": round(time.perf_counter() - start, 1),
            "grid": 20,
            "grid_calibration_tokens": sum(b.numel() for b in grid_calibration),
        },
    )


def distill(evaluation, args, results: dict, name: str, **options) -> None:
    saved = torch.load(args.work / "come.pt", weights_only=True)
    module = LayerwiseDistillation(model="demo", **options)
    module.configure_model()
    rebuild_merged_architecture(module.model, saved["groups"])
    module.model.load_state_dict(saved["state"])
    module.set_groups(saved["groups"])
    data = TextDataModule(tokenizer="demo", seq_len=args.seq_len, num_train_samples=args.train_samples, batch_size=4, seed=1)
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        max_epochs=1,
        limit_train_batches=args.steps if options["mode"] == "sp" else args.steps_per_layer,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    steps = args.steps if options["mode"] == "sp" else args.steps_per_layer * len(module.mapping)
    record(
        results,
        name,
        {
            "perplexity": perplexity(module.model, evaluation, progress=False),
            "options": options,
            "optimizer_steps": steps,
            "train_tokens": steps * 4 * args.seq_len,
            "fit_seconds": round(seconds, 1),
            "merged_layers": len(module.mapping),
        },
    )


LABELS = {
    "dense": "dense (30 layers)",
    "bi_removal": "BI one-shot removal (ShortGPT)",
    "sum_merge": "sum-merge (weight average, CoMe ratios)",
    "come": "CoMe (p = 1, rho = 0)",
    "come_p": "CoMe-P (grid n = 20)",
    "come_sp": "CoMe + sp distillation",
    "come_mp": "CoMe + mp distillation (student path)",
    "come_mp_teacher_forced": "CoMe + mp distillation (teacher-forced)",
}


def report(results: dict) -> str:
    """Markdown table of every finished stage, with the settings that produced it."""
    settings = results["settings"]
    lines = [
        "## CoMe evidence: SmolLM2-135M, 30 -> 23 layers (benchmarks/merging_evidence.py)",
        "",
        f"Evaluation: {settings['evaluation']}. Calibration: {settings['calibration_samples']} x {settings['seq_len']} "
        f"WikiText-2 validation blocks (seed 0); CoMe-P scores each of the 21 candidates on {settings['grid_samples']} of them. "
        f"CPU, {settings['threads']} thread(s).",
        "",
        "| method | layers | WikiText-2 PPL | notes |",
        "|---|---|---|---|",
    ]
    keys = [k for k in results if k != "settings"]
    for key in sorted(keys, key=lambda k: (list(LABELS).index(k.split("@")[0]), k)):
        base, _, tag = key.partition("@")
        label = LABELS[base] + (f" ({tag})" if tag else "")
        row = results[key]
        if "optimizer_steps" in row:
            note = f"{row['optimizer_steps']} steps x 4 x {settings['seq_len']} tokens ({row['train_tokens']} tokens), {row['fit_seconds']} s fit"
        elif "merge_seconds" in row:
            note = f"merge {row['merge_seconds']} s"
        elif "removed" in row:
            note = f"removed {row['removed']}"
        else:
            note = ""
        lines.append(f"| {label} | {30 if key == 'dense' else 23} | {row['perplexity']:.1f} | {note} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stages", default="training-free,distill")
    parser.add_argument("--num_layers", type=int, default=7)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--eval_samples", type=int, default=64)
    parser.add_argument("--calibration_samples", type=int, default=64)
    parser.add_argument("--grid_samples", type=int, default=8, help="calibration blocks scoring each CoMe-P candidate")
    parser.add_argument("--train_samples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=28, help="sp optimizer steps (batch 4)")
    parser.add_argument("--steps_per_layer", type=int, default=4, help="mp optimizer steps per merged layer (batch 4)")
    parser.add_argument("--work", type=Path, default=Path("runs/merging_evidence"))
    parser.add_argument("--distill_modes", default="sp,mp,mp_tf")
    parser.add_argument("--tag", default="", help="suffix of the result keys, e.g. a larger budget")
    args = parser.parse_args()
    torch.manual_seed(0)
    args.work.mkdir(parents=True, exist_ok=True)
    stages = args.stages.split(",")
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if stages == ["report"]:
        update_section("merging", "merging-evidence", report(results))
        return
    results["settings"] = {
        **{k: str(v) for k, v in vars(args).items()},
        "model": "SmolLM2-135M (demo, fp32)",
        "threads": torch.get_num_threads(),
        "evaluation": f"WikiText-2 test, first {args.eval_samples} x {args.seq_len} tokens",
        "versions": package_versions(),
    }
    model, tokenizer = load_model("demo")
    evaluation = load_blocks(tokenizer, "wikitext2", split="test", seq_len=args.seq_len, num_samples=args.eval_samples)
    if "training-free" in stages:
        training_free(model, tokenizer, evaluation, args, results)
    if "distill" in stages:
        del model
        tag = f"@{args.tag}" if args.tag else ""
        modes = args.distill_modes.split(",")
        if "sp" in modes:
            distill(evaluation, args, results, "come_sp" + tag, mode="sp", learning_rate=1e-5)
        if "mp" in modes:
            distill(evaluation, args, results, "come_mp" + tag, mode="mp")
        if "mp_tf" in modes:
            distill(evaluation, args, results, "come_mp_teacher_forced" + tag, mode="mp", teacher_forced=True)
    update_section("merging", "merging-evidence", report(results))


if __name__ == "__main__":
    main()
