"""Wanda / SparseGPT on SmolLM2: this package's ``sparsify`` vs llm-compressor, same weights, data and evaluation.

llm-compressor pins an older transformers, so it runs in its own virtual environment
(``--llmc_python``; never a dependency of this package). ``--make_llmc_venv`` creates it from the
system Python 3.11 with the ordinary pip client (torch first, so the CPU wheel is the one used)::

    python3.11 -m venv /work/venv-llmc
    /work/venv-llmc/bin/pip install torch==2.13.0 && /work/venv-llmc/bin/pip install 'llmcompressor==0.14.*'

Both sides read the same plain HF directory (the demo model saved once) and the same C4
calibration blocks (token ids drawn once by this package and saved to ``calibration.pt``), prune
only the decoder's projections (``lm_head`` kept), and save a plain dense HF directory; the saved
models are then evaluated by this package's ``evaluate`` command on the same WikiText-2 and C4 test
blocks. Each pruning run is its own process: wall and CPU seconds (``time.process_time``, all
threads of the process) of the pruning call alone (model load excluded), and the process's peak
RSS. Runs are interleaved: per configuration and repeat, the sides run one after the other in an
order that rotates with the repeat, so every side sees the machine's load alike; ratios are taken
per repeat and reported as median and range.

``--baseline_ref REF`` adds a third side for the SparseGPT configurations: this package's code as
of git ``REF`` (extracted once into the work directory and put first on ``PYTHONPATH``), so a
change to the package is measured before/after against the peer in the same run.

Rows ``*-dlp`` run this package alone: DLP allocation is what llm-compressor does not offer.

Writes ``benchmarks/results/sparsity_vs_llmcompressor.json`` and the ``sparsity-vs-llmcompressor``
section of ``docs/results/peers.md``::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sparsity_vs_llmcompressor.py --configs all --repeats 2 --baseline_ref e6ce72c
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from process_memory import peak_rss_mb

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
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
    "wanda-70-dlp": ("wanda", 0.7, "dlp", None),
    "sparsegpt-70-dlp": ("sparsegpt", 0.7, "dlp", None),
}
SIDES = ("package", "llmc", "base")


def package_worker(args, method: str, sparsity: float, allocation: str, structure: str | None) -> tuple[float, float]:
    """Prune with this package's ``SparsifyStage``; returns (wall, CPU) seconds of the pruning call."""
    from lightning_prune.model.loading import load_model
    from lightning_prune.stages import SparsifyStage

    model, _ = load_model(args.model_dir)
    blocks = torch.load(args.calibration, weights_only=True)
    stage = SparsifyStage(method=method, allocation=allocation, sparsity=None if structure else sparsity, structure=structure)
    start, cpu = time.perf_counter(), time.process_time()
    stage.plan(model, blocks, progress=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    shutil.copytree(args.model_dir, args.output, dirs_exist_ok=True)  # config and tokenizer; the weights are replaced
    model.save_pretrained(args.output)
    return seconds, cpu


def llmc_worker(args, method: str, sparsity: float, allocation: str, structure: str | None) -> tuple[float, float]:
    """Prune with llm-compressor's ``oneshot``; returns (wall, CPU) seconds of the ``oneshot`` call."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
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
    start, cpu = time.perf_counter(), time.process_time()
    oneshot(model=model, dataset=dataset, recipe=modifier, num_calibration_samples=len(blocks), max_seq_length=blocks.shape[1])
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    output = Path(args.output)
    shutil.copytree(args.model_dir, output, dirs_exist_ok=True)  # config and tokenizer, untouched
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    save_file(state, str(output / "model.safetensors"), metadata={"format": "pt"})
    return seconds, cpu


def worker(args) -> None:
    method, sparsity, allocation, structure = CONFIGS[args.config]
    seconds, cpu = (llmc_worker if args.side == "llmc" else package_worker)(args, method, sparsity, allocation, structure)
    peak = peak_rss_mb()
    code = sys.modules["lightning_prune"].__file__ if "lightning_prune" in sys.modules else None
    record = {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": peak, "threads": torch.get_num_threads(), "code": code}
    print("RESULT " + json.dumps(record))


def run_side(args, side: str, config: str, output: Path, calibration: Path, model_dir: Path, base_src: Path | None) -> dict:
    """Prune in a fresh process; a finished run already in ``output`` (``run.json``) is reused."""
    record = output / "run.json"
    if record.exists():
        return json.loads(record.read_text())
    python = args.llmc_python if side == "llmc" else sys.executable
    command = [python, __file__, "--worker", "--side", side, "--config", config]
    command += ["--model_dir", str(model_dir), "--calibration", str(calibration), "--output", str(output)]
    env = dict(os.environ)
    if side == "base":  # the package's code as of --baseline_ref first on the path (before the editable install)
        env["PYTHONPATH"] = os.pathsep.join([str(base_src), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        if side != "llmc":
            raise SystemExit(f"{side} {config} failed:\n{done.stderr[-4000:]}")
        errors = [line for line in done.stderr.splitlines() if line.strip()]
        result = {"failed": errors[-1] if errors else f"exit {done.returncode}"}  # the peer's own failure: a finding
        output.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(result))
        return result
    result = json.loads(lines[-1][len("RESULT ") :])
    if side == "base" and not str(result["code"]).startswith(str(base_src)):
        raise SystemExit(f"the baseline side imported {result['code']}, not the code in {base_src}")
    output.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(result))
    return result


def evaluate(args, model_dir: Path) -> dict:
    record = model_dir / "eval.json"
    if record.exists():
        result = json.loads(record.read_text())
        if result.get("settings", {}).get("model") == str(model_dir):  # a record of this very directory
            return result
    cli = str(Path(sys.executable).parent / "lightning-prune")
    command = [cli, "evaluate", "--model", str(model_dir), "--eval_data", "wikitext2,c4", "--seq_len", str(args.seq_len)]
    command += ["--eval_samples", str(args.eval_samples), "--dtype", "float32", "--device", "cpu", "--json", "true"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"evaluate {model_dir} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout[done.stdout.index("{") :])
    record.write_text(json.dumps(result))
    return result


def projections(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = load_file(str(model_dir / "model.safetensors"))
    return {k: v for k, v in state.items() if ".layers." in k and k.endswith("proj.weight")}


def sparsity_of(model_dir: Path) -> float:
    weights = projections(model_dir).values()
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def agreement(a: Path, b: Path) -> dict:
    """How far two pruned models are apart: share of weights whose kept/pruned state differs, largest weight difference."""
    first, second = projections(a), projections(b)
    differ = sum(int(((first[k] == 0) != (second[k] == 0)).sum()) for k in first)
    total = sum(w.numel() for w in first.values())
    largest = max(float((first[k] - second[k]).abs().max()) for k in first)
    scale = max(float(w.abs().max()) for w in first.values())
    return {"mask_differs": differ / total, "max_abs_weight_difference": largest, "max_abs_weight": scale}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def make_llmc_venv(path: Path) -> None:
    """The llm-compressor environment, with the ordinary pip client (torch first: the CPU wheel this machine has)."""
    python = shutil.which("python3.11") or sys.executable
    subprocess.run([python, "-m", "venv", str(path)], check=True)
    pip = [str(path / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"torch=={torch.__version__.split('+')[0]}"], check=True)
    subprocess.run([*pip, "llmcompressor==0.14.*"], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llmc_python", default="/work/venv-llmc/bin/python", help="python of the llm-compressor virtual environment")
    parser.add_argument("--make_llmc_venv", action="store_true", help="create that environment first when it is missing")
    parser.add_argument("--configs", default="wanda-50,sparsegpt-50", help=f"comma-separated, or all: {', '.join(CONFIGS)}")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved pruning runs per side and configuration (timing)")
    parser.add_argument("--baseline_ref", help="also run the SparseGPT configurations with the package code of this git ref")
    parser.add_argument("--calibration_samples", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--eval_samples", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    parser.add_argument("--calibration", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.configs == "all":
        args.configs = ",".join(CONFIGS)
    if args.make_llmc_venv and not Path(args.llmc_python).exists():
        make_llmc_venv(Path(args.llmc_python).parents[1])
    from lightning_prune.data.text import load_blocks
    from lightning_prune.model.loading import load_model

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="sparsity-vs-llmc-"))
    work.mkdir(parents=True, exist_ok=True)
    print("work directory", work, flush=True)
    model_dir, calibration = work / "dense", work / "calibration.pt"
    if not (model_dir / "config.json").exists() or not calibration.exists():
        model, tokenizer = load_model("demo")
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        blocks = load_blocks(
            tokenizer, "c4", split="validation", seq_len=args.seq_len, num_samples=args.calibration_samples, seed=args.seed
        )
        torch.save(blocks, calibration)
        del model
    base_src = None
    if args.baseline_ref:
        base_src = work / f"base-{args.baseline_ref}"
        if not (base_src / "lightning_prune").exists():
            base_src.mkdir(parents=True, exist_ok=True)
            archive = subprocess.run(
                ["git", "-C", str(ROOT), "archive", args.baseline_ref, "lightning_prune"], capture_output=True, check=True
            )
            subprocess.run(["tar", "-x", "-C", str(base_src)], input=archive.stdout, check=True)
        args.baseline_commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", args.baseline_ref], capture_output=True, text=True, check=True
        ).stdout.strip()
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
    started = time.time()
    for config in args.configs.split(","):
        method = CONFIGS[config][0]
        sides = ["package"] if config.endswith("-dlp") else ["package", "llmc"]
        if base_src is not None and method == "sparsegpt":
            sides.append("base")
        row = {side: {"runs": []} for side in sides}
        for repeat in range(args.repeats):
            order = sides[repeat % len(sides) :] + sides[: repeat % len(sides)]  # rotate who goes first
            for side in order:
                output = work / f"{config.replace(':', '')}-{side}-{repeat}"
                run = run_side(args, side, config, output, calibration, model_dir, base_src)
                row[side]["runs"].append(run)
                print(
                    config,
                    side,
                    repeat,
                    json.dumps({k: run.get(k) for k in ("seconds", "cpu_seconds", "peak_rss_mb", "failed")}),
                    flush=True,
                )
        failed = [side for side in sides if any("failed" in run for run in row[side]["runs"])]
        for side in failed:
            row[side] = {"failed": row[side]["runs"][0]["failed"]}
        sides = [side for side in sides if side not in failed]
        for side in sides:
            first = work / f"{config.replace(':', '')}-{side}-0"
            row[side]["sparsity"] = sparsity_of(first)
            row[side]["eval"] = evaluate(args, first)
        if "base" in row:
            row["base"]["vs_package"] = agreement(work / f"{config.replace(':', '')}-base-0", work / f"{config.replace(':', '')}-package-0")
        for side in sides:  # ratios per repeat (the runs of one repeat ran back to back)
            if side == "llmc" or "llmc" not in sides:
                continue
            # this package side (now, or at --baseline_ref) against llm-compressor, repeat by repeat
            pairs = list(zip(row[side]["runs"], row["llmc"]["runs"]))
            row[side]["speedup_wall"] = spread([o["seconds"] / p["seconds"] for p, o in pairs])  # > 1: package faster
            row[side]["speedup_cpu"] = spread([o["cpu_seconds"] / p["cpu_seconds"] for p, o in pairs])
            row[side]["rss_ratio"] = spread([p["peak_rss_mb"] / o["peak_rss_mb"] for p, o in pairs])  # < 1: package smaller
        rows[config] = row
        print(config, "done", f"{(time.time() - started) / 60:.1f} min", flush=True)
        write(args, rows, versions)


def perplexities(record: dict) -> dict:
    return {k: v for k, v in record.items() if isinstance(v, (int, float))} if "perplexity" not in record else record["perplexity"]


def _median(row: dict, key: str) -> float:
    return statistics.median(run[key] for run in row["runs"])


def _range(s: dict, digits: int = 2) -> str:
    return f"**{s['median']:.{digits}f}** ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def write(args, rows: dict, versions: list[str]) -> None:
    sys.path.insert(0, str(HERE))
    from report import update_section

    from lightning_prune.results import package_versions

    keys = ("configs", "repeats", "baseline_ref", "baseline_commit", "calibration_samples", "seq_len", "eval_samples", "seed")
    settings = {k: v for k, v in vars(args).items() if k in keys}
    result = {
        "model": "SmolLM2-135M (demo GGUF, fp32)",
        "settings": {**settings, "torch_threads": torch.get_num_threads()},
        "llmcompressor_transformers": versions,
        "rows": rows,
        "versions": package_versions(),
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    dense = perplexities(rows["dense"]["eval"])
    keys = sorted(dense)
    table, dlp, before = [], [], []
    for config, row in rows.items():
        if config == "dense":
            continue
        p = row["package"]
        pp = perplexities(p["eval"])
        if "llmc" not in row:
            owl_row = rows.get(config.replace("-dlp", "-owl"))
            owl = perplexities(owl_row["package"]["eval"]) if owl_row else {}
            dlp.append(
                f"| {config} | {_median(p, 'seconds'):.1f} | {_median(p, 'cpu_seconds'):.1f} | {_median(p, 'peak_rss_mb'):.0f} | {p['sparsity']:.3f} | "
                + " | ".join(f"{pp[k]:.2f}" + (f" ({pp[k] / owl[k]:.3f})" if owl else "") for k in keys)
                + " |"
            )
            continue
        c = row["llmc"]
        if "failed" in c:  # the peer's own error, in the speed-up column
            table.append(
                f"| {config} | {_median(p, 'seconds'):.1f} / – | llm-compressor fails: `{c['failed'][:120]}` "
                f"| {_median(p, 'cpu_seconds'):.1f} / – | – | {_median(p, 'peak_rss_mb'):.0f} / – | – | {p['sparsity']:.3f} / – | "
                + " | ".join(f"{pp[k]:.2f} / –" for k in keys)
                + " |"
            )
            continue
        cp = perplexities(c["eval"])
        table.append(
            f"| {config} | {_median(p, 'seconds'):.1f} / {_median(c, 'seconds'):.1f} | {_range(p['speedup_wall'])} "
            f"| {_median(p, 'cpu_seconds'):.1f} / {_median(c, 'cpu_seconds'):.1f} | {_range(p['speedup_cpu'])} "
            f"| {_median(p, 'peak_rss_mb'):.0f} / {_median(c, 'peak_rss_mb'):.0f} | {_range(p['rss_ratio'])} "
            f"| {p['sparsity']:.3f} / {c['sparsity']:.3f} | "
            + " | ".join(f"{pp[k]:.2f} / {cp[k]:.2f} ({pp[k] / cp[k]:.3f})" for k in keys)
            + " |"
        )
        if "base" in row:
            b = row["base"]
            agree = b["vs_package"]
            before.append(
                f"| {config} | {_median(b, 'cpu_seconds'):.1f} → {_median(p, 'cpu_seconds'):.1f} "
                f"| {_range(b['speedup_cpu'])} → {_range(p['speedup_cpu'])} "
                f"| {_range(b['speedup_wall'])} → {_range(p['speedup_wall'])} "
                f"| {_median(b, 'peak_rss_mb'):.0f} → {_median(p, 'peak_rss_mb'):.0f} "
                f"| {_range(b['rss_ratio'])} → {_range(p['rss_ratio'])} "
                f"| {agree['mask_differs']:.2e} / {agree['max_abs_weight_difference']:.1e} | "
                + " | ".join(f"{perplexities(b['eval'])[k]:.2f} → {pp[k]:.2f}" for k in keys)
                + " |"
            )
    base = settings.get("baseline_commit") or settings.get("baseline_ref")
    before_text = (
        f"""
SparseGPT before / after the package change measured, against llm-compressor in the same run ("before" = the package at
`{base}`, run as a third side of every SparseGPT configuration; speed-up and RSS ratio as above, each against the same
llm-compressor runs). Last column: share of projection weights whose kept/pruned state differs between the two package
versions, and the largest weight difference (rounding of the reordered updates).

| config | CPU s before → after | CPU speed-up vs llmc before → after | wall speed-up before → after | peak RSS MB before → after | RSS ratio before → after | masks differ / max Δw | {" | ".join(f"PPL {k} before → after" for k in keys)} |
|---|---:|---:|---:|---:|---:|---:|{"---:|" * len(keys)}
{chr(10).join(before)}
"""
        if before
        else ""
    )
    dlp_text = (
        f"""
DLP allocation (003), which llm-compressor does not have, on the same blocks (package only; in brackets: perplexity / the
package's OWL row at the same sparsity):

| config | seconds | CPU s | peak RSS MB | measured sparsity | {" | ".join(f"PPL {k}" for k in keys)} |
|---|---:|---:|---:|---:|{"---:|" * len(keys)}
{chr(10).join(dlp)}
"""
        if dlp
        else ""
    )
    baseline = f" --baseline_ref {args.baseline_ref}" if args.baseline_ref else ""
    update_section(
        "peers",
        "sparsity-vs-llmcompressor",
        f"""
## Sparsity: `sparsify` vs llm-compressor (`benchmarks/sparsity_vs_llmcompressor.py`)

SmolLM2-135M fp32, CPU ({torch.get_num_threads()} thread, shared 2-core machine). Same plain HF directory, the same
{args.calibration_samples}×{args.seq_len} C4 calibration blocks (token ids saved once, read by both), decoder projections only
(`lm_head` kept), evaluation by `lightning-prune evaluate` on {args.eval_samples} blocks of {args.seq_len} tokens per source
(dense: {", ".join(f"{k} {dense[k]:.2f}" for k in keys)}). llm-compressor {versions[0] if versions else "?"} (transformers
{versions[1] if len(versions) > 1 else "?"}) in its own virtual environment; OWL with the package's M = 5, λ = 0.08 on both.
Each pruning run is its own process; {args.repeats} interleaved repeat(s) per configuration (the order of the tools rotates).
Seconds: the pruning call only (model load excluded), wall and CPU (all threads of the process); peak RSS: the whole
pruning process. Speed-up = llm-compressor time / package time per repeat (> 1: package faster), RSS ratio = package /
llm-compressor per repeat (< 1: package smaller), each as median (range); perplexity ratio package / llm-compressor (< 1:
package better). Times and RSS columns: medians.

| config | wall s package / llmc | wall speed-up | CPU s package / llmc | CPU speed-up | peak RSS MB package / llmc | RSS ratio | measured sparsity package / llmc | {" | ".join(f"PPL {k} package / llmc (ratio)" for k in keys)} |
|---|---:|---:|---:|---:|---:|---:|---:|{"---:|" * len(keys)}
{chr(10).join(table)}
{dlp_text}{before_text}
Command (the first run also saves the model and draws the blocks):

    OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/sparsity_vs_llmcompressor.py --configs {args.configs} --repeats {args.repeats}{baseline} --calibration_samples {args.calibration_samples} --seq_len {args.seq_len} --eval_samples {args.eval_samples}
""",
    )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
