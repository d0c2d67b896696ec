"""Which heal repairs best at a fixed token budget, chosen on held-out text only (issue 13).

SmolLM2-135M (``demo``) with 7 of 30 layers removed (iterative Block Influence + magnitude
compensation, the repair evidence's picks), healed with one configuration per run; every run
trains on the same number of WikiText-2-valid tokens. Each configuration is a shipped recipe
run through ``lightning-prune fit`` in-process, on a model saved once:

- ``bases``: the dense model (the demo GGUF saved as safetensors, the same weights), the pruned
  and compensated model, and the pruned, compensated and gap-distilled model (``prune`` /
  ``prune_gap_heal`` planned with ``--dry_run`` on ``demo``, then ``lightning-prune apply``).
  Healing starts from a base with ``--stages '[]'``; the teacher is the dense base.
- the selection data are **not** the reported test data: the first ``--eval_samples`` blocks of
  the bundled C4 *validation* half (out of domain; the reported C4 figures use the test half)
  and the last ``--eval_samples`` blocks of the seed-0 draw order of WikiText-2 valid (in
  domain; training takes blocks from the front of that order and never reaches them). WikiText-2
  test is not measured here.

The score is the mean of the two log-perplexities (no single corpus decides). The JSON
(``benchmarks/results/heal_selection.json``) keeps every configuration tried, its flags, both
perplexities and its wall time; a configuration already in it is not run again.

Usage: OMP_NUM_THREADS=1 python benchmarks/heal_selection.py --configs kd_r8_lr3e-4,kd_full_lr1e-4 [--tokens 65536]
"""

import argparse
import json
import math
import shlex
import shutil
import time
from pathlib import Path

from repair_evidence import bind_checkout
from report import ROOT, update_section

SEQ_LEN = 128
LORA_KD = ["--config", "prune_distill_heal"]
FULL = ["--model.init_args.finetune", "full"]


def lora(rank: int) -> list[str]:
    return ["--model.init_args.lora_rank", str(rank), "--model.init_args.lora_alpha", str(2 * rank)]


def lr(value: str) -> list[str]:
    return ["--model.init_args.learning_rate", value]


def batch(blocks: int, accumulate: int) -> dict:
    return {"batch_size": blocks, "accumulate": accumulate}


LM = ["--model.init_args.distill", "null"]
# name -> (base, recipe flags, optimizer-step shape); the budget is the same for all
CONFIGS = {
    # LoRA r8 on every projection, teacher KL (prune_distill_heal as shipped, lr 3e-4, 16 blocks per step)
    "kd_r8_lr3e-4": ("pruned", [*LORA_KD], batch(4, 4)),
    "kd_r8_lr1e-3": ("pruned", [*LORA_KD, *lr("1e-3")], batch(4, 4)),
    "kd_r8_lr1e-3_b4": ("pruned", [*LORA_KD, *lr("1e-3")], batch(4, 1)),
    "kd_r8_lr3e-3": ("pruned", [*LORA_KD, *lr("3e-3")], batch(4, 4)),
    "kd_r8_lr3e-3_b4": ("pruned", [*LORA_KD, *lr("3e-3")], batch(4, 1)),
    "kd_r32_lr3e-3": ("pruned", [*LORA_KD, *lora(32), *lr("3e-3")], batch(4, 4)),
    "kd_r32_lr1e-3_b4": ("pruned", [*LORA_KD, *lora(32), *lr("1e-3")], batch(4, 1)),
    # full-parameter training, teacher KL (embeddings frozen unless said)
    "kd_full_lr3e-5": ("pruned", [*LORA_KD, *FULL, *lr("3e-5")], batch(4, 4)),
    "kd_full_lr1e-4": ("pruned", [*LORA_KD, *FULL, *lr("1e-4")], batch(4, 4)),
    "kd_full_lr3e-4": ("pruned", [*LORA_KD, *FULL, *lr("3e-4")], batch(4, 4)),
    "kd_full_lr1e-4_b4": ("pruned", [*LORA_KD, *FULL, *lr("1e-4")], batch(4, 1)),
    "kd_full_lr1e-3": ("pruned", [*LORA_KD, *FULL, *lr("1e-3")], batch(4, 4)),
    "kd_full_lr3e-4_b4": ("pruned", [*LORA_KD, *FULL, *lr("3e-4")], batch(4, 1)),
    "kd_full_lr3e-4_emb": ("pruned", [*LORA_KD, *FULL, *lr("3e-4"), "--model.init_args.train_embeddings", "true"], batch(4, 4)),
    "kd_full_lr1e-4_emb": ("pruned", [*LORA_KD, *FULL, *lr("1e-4"), "--model.init_args.train_embeddings", "true"], batch(4, 4)),
    # LM loss instead of / mixed with the teacher KL
    "lm_full_lr1e-4": ("pruned", [*LORA_KD, *FULL, *lr("1e-4"), *LM], batch(4, 4)),
    "mix_full_lr1e-4": ("pruned", [*LORA_KD, *FULL, *lr("1e-4"), "--model.init_args.distill.alpha", "0.5"], batch(4, 4)),
    # the same after gap distillation (prune_gap_heal's base)
    "gap_kd_full_lr1e-4": ("gap", [*LORA_KD, *FULL, *lr("1e-4")], batch(4, 4)),
    "gap_kd_r8_lr1e-3": ("gap", [*LORA_KD, *lr("1e-3")], batch(4, 4)),
    # dense controls: the same heal with the LM loss (the teacher KL of the dense model to itself is 0)
    "control_r8_lr3e-4": ("dense", [*LORA_KD, *LM], batch(4, 4)),
    "control_r8_lr1e-3": ("dense", [*LORA_KD, *lr("1e-3"), *LM], batch(4, 4)),
    "control_full_lr1e-4": ("dense", [*LORA_KD, *FULL, *lr("1e-4"), *LM], batch(4, 4)),
    "control_full_lr3e-5": ("dense", [*LORA_KD, *FULL, *lr("3e-5"), *LM], batch(4, 4)),
}


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="", help=f"comma-separated, from: {', '.join(CONFIGS)}")
    parser.add_argument("--tokens", type=int, default=65536, help="healing tokens of every run")
    parser.add_argument("--eval_samples", type=int, default=32, help="held-out blocks per source")
    parser.add_argument("--runs_dir", default=str(ROOT / "runs" / "heal_selection"))
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "heal_selection.json"))
    return parser.parse_args()


def build_bases(runs: Path) -> dict[str, Path]:
    """The dense, pruned and gap-distilled models as local directories (built once)."""
    from lightning_prune.cli import main
    from lightning_prune.model.loading import load_model

    bases = {"dense": runs / "bases" / "dense", "pruned": runs / "bases" / "pruned" / "model", "gap": runs / "bases" / "gap" / "model"}
    if not bases["dense"].exists():
        model, tokenizer = load_model("demo", dtype="float32")
        model.save_pretrained(bases["dense"])
        tokenizer.save_pretrained(bases["dense"])
    for name, recipe in (("pruned", "prune_distill_heal"), ("gap", "prune_gap_heal")):
        if bases[name].exists():
            continue
        plan = runs / "bases" / f"{name}_plan"
        flags = ["--data.init_args.calibration_samples", "16", "--evaluate", "false"]
        main(["fit", "--config", recipe, *flags, "--dry_run", "true", "--run_dir", str(plan)])
        main(["apply", "--plan", str(plan), "--model", "demo", "--dtype", "float32", "--output_dir", str(bases[name].parent)])
    return bases


def heldout(tokenizer, samples: int) -> dict:
    """The selection blocks: C4 validation (first blocks) and WikiText-2 valid (last blocks of the seed-0 order)."""
    import torch

    from lightning_prune.data.text import load_blocks

    c4 = load_blocks(tokenizer, "c4", split="validation", seq_len=SEQ_LEN, num_samples=samples)
    every = load_blocks(tokenizer, "wikitext2", split="validation", seq_len=SEQ_LEN, num_samples=None)
    order = torch.randperm(len(every), generator=torch.Generator().manual_seed(0))  # TextDataModule's draw (seed 0)
    return {"c4_valid": c4, "wikitext2_valid_tail": every[order[-samples:]], "wikitext2_valid_blocks": len(every)}


def run(name: str, bases: dict, blocks: dict, args: argparse.Namespace) -> dict:
    from lightning_prune.cli import main
    from lightning_prune.evaluation.perplexity import perplexity
    from lightning_prune.model.loading import load_model

    base, flags, shape = CONFIGS[name]
    per_step = shape["batch_size"] * shape["accumulate"]
    steps = args.tokens // (per_step * SEQ_LEN)
    if steps * per_step > blocks["wikitext2_valid_blocks"] - args.eval_samples:
        raise SystemExit(f"{args.tokens} tokens would reach the held-out WikiText-2 blocks")
    directory = Path(args.runs_dir) / name
    budget = ["--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps), "--trainer.limit_val_batches", "0"]
    budget += ["--trainer.accumulate_grad_batches", str(shape["accumulate"]), "--data.init_args.batch_size", str(shape["batch_size"])]
    budget += ["--data.init_args.num_train_samples", str(steps * per_step), "--data.init_args.seq_len", str(SEQ_LEN)]
    shared = ["--stages", "[]", "--model.init_args.model", str(bases[base]), "--evaluate", "false"]
    shared += ["--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false"]
    teacher = [] if "null" in flags else ["--model.init_args.distill.teacher", str(bases["dense"])]
    argv = ["fit", *flags[:2], *shared, *budget, *teacher, *flags[2:], "--run_dir", str(directory)]
    start = time.perf_counter()
    main(argv)
    seconds = time.perf_counter() - start
    model, _ = load_model(str(directory / "model"), dtype="float32")
    values = {key: perplexity(model, blocks[key], batch_size=8, progress=False) for key in ("c4_valid", "wikitext2_valid_tail")}
    shutil.rmtree(directory / "model")  # 0.5 GB each; the metrics are what the selection needs
    return {
        "base": base,
        "flags": shlex.join(flags),
        "steps": steps,
        "blocks_per_step": per_step,
        "tokens": steps * per_step * SEQ_LEN,
        "seconds": round(seconds, 1),
        "tokens_per_second": round(steps * per_step * SEQ_LEN / seconds, 1),
        "perplexity": {k: round(v, 3) for k, v in values.items()},
        "score": round(sum(math.log(v) for v in values.values()) / len(values), 4),
        "command": "lightning-prune " + shlex.join(argv),
    }


def markdown(record: dict) -> str:
    """The ``heal-selection`` section: every configuration tried, best score first."""
    s, unhealed = record["settings"], record["unhealed"]
    dense = unhealed["dense"]
    lines = [
        "## Choosing the heal on held-out text (`benchmarks/heal_selection.py`)",
        "",
        "SmolLM2-135M (`demo`) with layers [14, 17, 13, 15, 12, 25, 16] removed (iterative Block Influence) and magnitude "
        "compensation, healed by one configuration per row, every row with the same WikiText-2-valid training tokens. "
        f"Selection data, never the reported test data: the first {s['eval_samples']} × {s['seq_len']} blocks of the bundled C4 "
        f"*validation* half (out of domain) and the last {s['eval_samples']} blocks of the seed-0 draw order of WikiText-2 valid "
        "(in domain; training draws from the front of that order). Score = mean of the two log-perplexities (lower is "
        "better). `/ dense` divides by the dense model without healing on the same blocks. Base `pruned` = removal + "
        "compensation; `gap` = the same + `distill_gap` (recipe defaults); `dense` = a control. Flags are on top of "
        "`--config prune_distill_heal` (teacher-KL LoRA r8, alpha 16, on every projection, lr 3e-4). One CPU thread, on a "
        "2-core machine shared with another job, so seconds vary with its load.",
        "",
        "| configuration | base | flags | steps × blocks | tokens | PPL C4 valid | PPL WikiText-2 valid tail | C4 / dense | score | s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, values in unhealed.items():
        ppl = values
        lines.append(
            f"| unhealed | {name} | - | - | 0 | {ppl['c4_valid']:.2f} | {ppl['wikitext2_valid_tail']:.2f} | "
            f"{ppl['c4_valid'] / dense['c4_valid']:.3f} | {sum(math.log(v) for v in ppl.values()) / 2:.4f} | - |"
        )
    for key, r in sorted(record["configs"].items(), key=lambda item: item[1]["score"]):
        ppl = r["perplexity"]
        lines.append(
            f"| `{key.split('@')[0]}` | {r['base']} | `{r['flags'].replace('--config prune_distill_heal', '').strip() or '-'}` | "
            f"{r['steps']} × {r['blocks_per_step']} | {r['tokens']:,} | {ppl['c4_valid']:.2f} | {ppl['wikitext2_valid_tail']:.2f} | "
            f"{ppl['c4_valid'] / dense['c4_valid']:.3f} | {r['score']:.4f} | {r['seconds']:.0f} |"
        )
    lines += [
        "",
        "Reproduce a row: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/heal_selection.py --configs <configuration> --tokens "
        "<tokens>` (the full command of each run is in `benchmarks/results/heal_selection.json`).",
    ]
    return "\n".join(lines)


def main() -> None:
    args = arguments()
    bind_checkout()
    from lightning_prune.model.loading import load_tokenizer
    from lightning_prune.results import package_versions

    runs = Path(args.runs_dir)
    bases = build_bases(runs)
    blocks = heldout(load_tokenizer(str(bases["dense"])), args.eval_samples)
    output = Path(args.output)
    record = json.loads(output.read_text()) if output.exists() else {"configs": {}}
    record["settings"] = {"eval_samples": args.eval_samples, "seq_len": SEQ_LEN, "selection_data": ["c4_valid", "wikitext2_valid_tail"]}
    if "unhealed" not in record:
        from lightning_prune.evaluation.perplexity import perplexity
        from lightning_prune.model.loading import load_model

        record["unhealed"] = {}
        for name, path in bases.items():
            model = load_model(str(path), dtype="float32")[0]
            record["unhealed"][name] = {
                k: round(perplexity(model, blocks[k], progress=False), 3) for k in ("c4_valid", "wikitext2_valid_tail")
            }
    for name in [c.strip() for c in args.configs.split(",") if c.strip()]:
        if name not in CONFIGS:
            raise SystemExit(f"--configs: {name!r} is not known; choose from {', '.join(CONFIGS)}")
        key = f"{name}@{args.tokens}"
        if key in record["configs"]:
            continue
        record["configs"][key] = run(name, bases, blocks, args)
        record["versions"] = package_versions()
        output.write_text(json.dumps(record, indent=2) + "\n")
        result = record["configs"][key]
        print(f"{key}: {result['perplexity']} score {result['score']} ({result['seconds']:.0f} s)", flush=True)
        update_section("healing", "heal-selection", markdown(record))
    update_section("healing", "heal-selection", markdown(record))


if __name__ == "__main__":
    main()
