"""Wanda / SparseGPT on SmolLM2: this package's ``sparsify`` vs llm-compressor, same weights, data and evaluation.

llm-compressor pins an older transformers, so it runs in its own virtual environment
(``--llmc_python``; never a dependency of this package), made from the system Python 3.11::

    python3.11 -m venv /work/venv-llmc
    /work/venv-llmc/bin/pip install torch==2.13.0 && /work/venv-llmc/bin/pip install 'llmcompressor==0.14.*'

Both sides read the same plain HF directory (the demo model saved once) and the same C4
calibration blocks (token ids drawn once by this package and saved to ``calibration.pt``), prune
only the decoder's projections (``lm_head`` kept), and save a plain dense HF directory; both saved
models are then evaluated by this package's ``evaluate`` command on the same WikiText-2 and C4 test
blocks. Each pruning run is its own process (wall time of the pruning call, excluding the model
load, and the process's peak RSS), the two tools alternating per configuration.

Writes ``benchmarks/results/sparsity_vs_llmcompressor.json`` and the ``sparsity-vs-llmcompressor``
section of ``docs/results/peers.md``::

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/sparsity_vs_llmcompressor.py --llmc_python /work/venv-llmc/bin/python
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "sparsity_vs_llmcompressor.json"
CONFIGS = {  # name: (method, sparsity, allocation, structure)
    "wanda-50": ("wanda", 0.5, "uniform", None),
    "sparsegpt-50": ("sparsegpt", 0.5, "uniform", None),
    "wanda-70": ("wanda", 0.7, "uniform", None),
    "sparsegpt-70": ("sparsegpt", 0.7, "uniform", None),
    "wanda-70-owl": ("wanda", 0.7, "owl", None),
    "sparsegpt-70-owl": ("sparsegpt", 0.7, "owl", None),
    "wanda-2:4": ("wanda", 0.5, "uniform", "2:4"),
    "sparsegpt-2:4": ("sparsegpt", 0.5, "uniform", "2:4"),
}


def package_worker(args, method: str, sparsity: float, allocation: str, structure: str | None) -> float:
    """Prune with this package's ``SparsifyStage``; returns the seconds of the pruning call."""
    from lightning_prune.model.loading import load_model
    from lightning_prune.stages import SparsifyStage

    model, _ = load_model(args.model_dir)
    blocks = torch.load(args.calibration, weights_only=True)
    stage = SparsifyStage(method=method, allocation=allocation, sparsity=None if structure else sparsity, structure=structure)
    start = time.perf_counter()
    stage.plan(model, blocks, progress=False)
    seconds = time.perf_counter() - start
    shutil.copytree(args.model_dir, args.output, dirs_exist_ok=True)  # config and tokenizer; the weights are replaced
    model.save_pretrained(args.output)
    return seconds


def llmc_worker(args, method: str, sparsity: float, allocation: str, structure: str | None) -> float:
    """Prune with llm-compressor's ``oneshot``; returns the seconds of the ``oneshot`` call."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.obcq import SparseGPTModifier
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    blocks = torch.load(args.calibration, weights_only=True)
    dataset = Dataset.from_dict({"input_ids": blocks.tolist(), "attention_mask": torch.ones_like(blocks).tolist()})
    # targets: the decoder layers (as llm-compressor's own examples; OWL allocates per target), so lm_head stays dense
    targets = [r"re:model.layers.\d+$"]
    options = {"sparsity": sparsity, "mask_structure": structure or "0:0", "targets": targets, "ignore": ["re:.*lm_head"]}
    if allocation == "owl":  # the package's OWL defaults: M = 5, λ = 0.08
        options.update(sparsity_profile="owl", owl_m=5, owl_lmbda=0.08)
    modifier = (WandaPruningModifier if method == "wanda" else SparseGPTModifier)(**options)
    start = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=modifier, num_calibration_samples=len(blocks), max_seq_length=blocks.shape[1])
    seconds = time.perf_counter() - start
    output = Path(args.output)
    shutil.copytree(args.model_dir, output, dirs_exist_ok=True)  # config and tokenizer, untouched
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    save_file(state, str(output / "model.safetensors"), metadata={"format": "pt"})
    return seconds


def worker(args) -> None:
    method, sparsity, allocation, structure = CONFIGS[args.config]
    seconds = (package_worker if args.side == "package" else llmc_worker)(args, method, sparsity, allocation, structure)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"seconds": seconds, "peak_rss_mb": peak}))


def run_side(args, side: str, config: str, output: Path, calibration: Path, model_dir: Path) -> dict:
    """Prune in a fresh process; a finished run already in ``output`` (``run.json``) is reused."""
    record = output / "run.json"
    if record.exists():
        return json.loads(record.read_text())
    python = sys.executable if side == "package" else args.llmc_python
    command = [python, __file__, "--worker", "--side", side, "--config", config]
    command += ["--model_dir", str(model_dir), "--calibration", str(calibration), "--output", str(output)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{side} {config} failed:\n{done.stderr[-4000:]}")
    record.write_text(lines[-1][len("RESULT ") :])
    return json.loads(record.read_text())


def evaluate(args, model_dir: Path) -> dict:
    cli = str(Path(sys.executable).parent / "lightning-prune")
    command = [cli, "evaluate", "--model", str(model_dir), "--eval_data", "wikitext2,c4", "--seq_len", str(args.seq_len)]
    command += ["--eval_samples", str(args.eval_samples), "--dtype", "float32", "--device", "cpu", "--json", "true"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"evaluate {model_dir} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout[done.stdout.index("{") :])


def sparsity_of(model_dir: Path) -> float:
    from safetensors.torch import load_file

    state = load_file(str(model_dir / "model.safetensors"))
    weights = [v for k, v in state.items() if ".layers." in k and k.endswith("proj.weight")]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llmc_python", default="/work/venv-llmc/bin/python", help="python of the llm-compressor virtual environment")
    parser.add_argument("--configs", default="wanda-50,sparsegpt-50", help=f"comma-separated, of: {', '.join(CONFIGS)}")
    parser.add_argument("--calibration_samples", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--eval_samples", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=["package", "llmc"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    parser.add_argument("--calibration", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    from lightning_prune.data.text import load_blocks
    from lightning_prune.model.loading import load_model

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="sparsity-vs-llmc-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir, calibration = work / "dense", work / "calibration.pt"
    if not (model_dir / "config.json").exists():
        model, tokenizer = load_model("demo")
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        blocks = load_blocks(
            tokenizer, "c4", split="validation", seq_len=args.seq_len, num_samples=args.calibration_samples, seed=args.seed
        )
        torch.save(blocks, calibration)
        del model
    versions = (
        subprocess.run(
            [args.llmc_python, "-c", "import llmcompressor, transformers; print(llmcompressor.__version__, transformers.__version__)"],
            capture_output=True,
            text=True,
        )
        .stdout.strip()
        .splitlines()[-1:]
    )  # the last line: llm-compressor may log on import
    versions = versions[0].split() if versions else []
    rows = {"dense": {"eval": evaluate(args, model_dir)}}
    print("dense", rows["dense"]["eval"].get("perplexity", rows["dense"]["eval"]), flush=True)
    for config in args.configs.split(","):
        row = {}
        for side in ("package", "llmc"):
            output = work / f"{config.replace(':', '')}-{side}"
            row[side] = run_side(args, side, config, output, calibration, model_dir)
            row[side]["sparsity"] = sparsity_of(output)
            row[side]["eval"] = evaluate(args, output)
            print(config, side, json.dumps(row[side]), flush=True)
        rows[config] = row
        write(args, rows, versions)


def perplexities(record: dict) -> dict:
    return {k: v for k, v in record.items() if isinstance(v, (int, float))} if "perplexity" not in record else record["perplexity"]


def write(args, rows: dict, versions: list[str]) -> None:
    sys.path.insert(0, str(HERE))
    from report import update_section

    from lightning_prune.results import package_versions

    settings = {k: v for k, v in vars(args).items() if k in ("configs", "calibration_samples", "seq_len", "eval_samples", "seed")}
    result = {
        "model": "SmolLM2-135M (demo GGUF, fp32)",
        "settings": settings,
        "llmcompressor_transformers": versions,
        "rows": rows,
        "versions": package_versions(),
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    dense = perplexities(rows["dense"]["eval"])
    table = []
    for config, row in rows.items():
        if config == "dense":
            continue
        p, c = row["package"], row["llmc"]
        pp, cp = perplexities(p["eval"]), perplexities(c["eval"])
        table.append(
            f"| {config} | {p['seconds']:.1f} / {c['seconds']:.1f} | **{c['seconds'] / p['seconds']:.2f}** | {p['peak_rss_mb']:.0f} / {c['peak_rss_mb']:.0f} "
            f"| {p['peak_rss_mb'] / c['peak_rss_mb']:.2f} | {p['sparsity']:.3f} / {c['sparsity']:.3f} | "
            + " | ".join(f"{pp[k]:.2f} / {cp[k]:.2f} ({pp[k] / cp[k]:.3f})" for k in sorted(pp))
            + " |"
        )
    keys = sorted(dense)
    update_section(
        "peers",
        "sparsity-vs-llmcompressor",
        f"""
## Sparsity: `sparsify` vs llm-compressor (`benchmarks/sparsity_vs_llmcompressor.py`)

SmolLM2-135M fp32, CPU ({torch.get_num_threads()} thread(s), shared 2-core machine). Same plain HF directory, the same
{args.calibration_samples}×{args.seq_len} C4 calibration blocks (token ids saved once, read by both), decoder projections only
(`lm_head` kept), evaluation by `lightning-prune evaluate` on {args.eval_samples} blocks of {args.seq_len} tokens per source
(dense: {", ".join(f"{k} {dense[k]:.2f}" for k in keys)}). llm-compressor {versions[0] if versions else "?"} (transformers
{versions[1] if len(versions) > 1 else "?"}) in its own virtual environment. Wall time: the pruning call only (model load
excluded); peak RSS: the whole pruning process. Ratios: time llm-compressor / package (> 1: package faster), RSS package /
llm-compressor, perplexity package / llm-compressor (< 1: package better).

| config | seconds package / llmc | speed-up | peak RSS MB package / llmc | RSS ratio | measured sparsity package / llmc | {" | ".join(f"PPL {k} package / llmc (ratio)" for k in keys)} |
|---|---:|---:|---:|---:|---:|{"---:|" * len(keys)}
{chr(10).join(table)}

Command:

    OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/sparsity_vs_llmcompressor.py --configs {args.configs} --calibration_samples {args.calibration_samples} --seq_len {args.seq_len} --eval_samples {args.eval_samples}
""",
    )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
