"""Peak host memory and time of calibration with and without layer-wise onloading, as depth grows (issue 12).

Three calibration-driven tasks (Block Influence scoring, Wanda-DLP calibration at 50 %, one CoMe
merge step) on two model kinds, at several depths:

- SmolLM2-135M (``demo``), its first k layers, saved once as an fp32 safetensors directory;
- a random Llama of about 1.2 B parameters at 24 layers (hidden 2048, intermediate 5504, 16
  heads, 4 KV heads, vocabulary 32000), written layer by layer as fp32 safetensors shards so
  that the benchmark itself never holds it.

Three ways to hold the model, each measured in a fresh process (peak RSS = the kernel's
``VmHWM``, which counts mapped file pages that are resident):

- ``memory``: ``from_pretrained``, the whole model in host memory (the compute device here);
- ``host``: the same, with ``onload: layer`` (layers in host memory, a copy on the device while
  it runs; on this CPU-only machine it only adds copies: its ratio is the overhead);
- ``disk``: ``onload: layer`` + ``offload_dir``: the checkpoint streamed, layers read from
  their memory-mapped files one at a time (what keeps host memory flat here; on a GPU machine
  ``host`` keeps device memory flat the same way).

Calibration data: random token ids (memory and time do not depend on their values), same blocks
for every run. Per task and mode the table gives the peak at each depth, the least-squares slope
in MiB per layer, and the time ratio to ``memory`` at the deepest model.

Usage: OMP_NUM_THREADS=2 python benchmarks/onload_memory.py [--kinds smollm2,synthetic] [--repeats 1]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from process_memory import peak_rss_mb
from report import ROOT, update_section

TASKS = ("bi", "wanda_dlp", "come")
MODES = ("memory", "host", "disk")
SYNTHETIC = {
    "hidden_size": 2048,
    "intermediate_size": 5504,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}
DEPTHS = {"smollm2": [10, 20, 30], "synthetic": [6, 12, 24]}


def build_smollm2(directory: Path, depth: int) -> None:
    """SmolLM2's first ``depth`` layers as an fp32 safetensors directory."""
    from lightning_prune.model.loading import load_model
    from lightning_prune.model.surgery import remove_layers

    model, _ = load_model("demo", dtype="float32")
    if depth < model.config.num_hidden_layers:
        remove_layers(model, list(range(depth, model.config.num_hidden_layers)))
    model.save_pretrained(directory, safe_serialization=True)


def build_synthetic(directory: Path, depth: int, seed: int = 0) -> None:
    """A random Llama written one layer per shard, never whole in memory."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=depth, **SYNTHETIC)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(p.shape) for name, p in skeleton.state_dict().items()}
    groups = [[n for n in shapes if not n.startswith("model.layers.")]]
    groups += [[n for n in shapes if n.startswith(f"model.layers.{i}.")] for i in range(depth)]
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    directory.mkdir(parents=True)
    for index, names in enumerate(groups):
        file = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name])
            else:
                tensors[name] = torch.randn(shapes[name], generator=generator) * 0.02
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        del tensors
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(directory)


def worker(args: argparse.Namespace) -> None:
    """One measurement in this process: load the model the chosen way, run the task, print JSON."""
    import torch

    from lightning_prune.importance import ScoringOptions, score_layers
    from lightning_prune.model.loading import load_config
    from lightning_prune.onload import LayerOnloader, finish_onload
    from lightning_prune.stages import MergeStage, SparsifyStage

    start = time.perf_counter()
    config = load_config(args.model_dir)
    if args.mode == "disk":
        from lightning_prune.model.streaming import load_streaming

        offload = tempfile.mkdtemp(prefix="onload-bench-")
        model, _ = load_streaming(args.model_dir, config, torch.float32, "cpu", offload)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
        if args.mode == "host":
            LayerOnloader(model, "cpu").attach()
    loaded = time.perf_counter()
    blocks = torch.randint(0, config.vocab_size, (args.blocks, args.seq_len), generator=torch.Generator().manual_seed(0))
    if args.task == "bi":
        score_layers(model, blocks, "block_influence", ScoringOptions(batch_size=args.batch_size, progress=False))
    elif args.task == "wanda_dlp":
        SparsifyStage(method="wanda", allocation="dlp", sparsity=0.5, batch_size=args.batch_size).plan(model, blocks, progress=False)
    else:
        MergeStage(num_layers=1, batch_size=args.batch_size).plan(model, blocks, progress=False)
    done = time.perf_counter()
    finish_onload(model)
    print(json.dumps({"peak_mib": peak_rss_mb(), "load_s": loaded - start, "task_s": done - loaded}))


def slope(depths: list[int], values: list[float]) -> float:
    """Least-squares slope of values against depths."""
    mean_d, mean_v = sum(depths) / len(depths), sum(values) / len(values)
    return sum((d - mean_d) * (v - mean_v) for d, v in zip(depths, values)) / sum((d - mean_d) ** 2 for d in depths)


def measure(model_dir: Path, task: str, mode: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", "--model_dir", str(model_dir), "--task", task, "--mode", mode]
    command += ["--blocks", str(args.blocks), "--seq_len", str(args.seq_len), "--batch_size", str(args.batch_size)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{task}/{mode} on {model_dir} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def render(result: dict) -> str:
    lines = [
        "## Layer-wise onloading: peak host memory against depth (`benchmarks/onload_memory.py`)",
        "",
        f"Calibration: {result['blocks']} random blocks × {result['seq_len']} tokens, batch {result['batch_size']}, fp32, "
        "CPU (2 cores). Each cell is one fresh process; peak = `VmHWM` (resident pages, mapped files included). "
        "`memory`: whole model in host memory; `host`: `onload: layer`, layers in host memory; "
        "`disk`: `onload: layer` + `offload_dir`, the safetensors checkpoint streamed and its layers mapped one at a time. "
        "Slope: least-squares MiB per decoder layer. Time ratio: task seconds / `memory` task seconds at the deepest model.",
        "",
    ]
    for kind, rows in result["kinds"].items():
        depths = rows["depths"]
        lines += [f"### {kind} ({rows['description']})", ""]
        lines += [
            "| task | mode | "
            + " | ".join(f"peak MiB at {d} layers" for d in depths)
            + " | slope MiB/layer | task s (deepest) | time ratio |"
        ]
        lines += ["|---|---|" + "---:|" * (len(depths) + 3)]
        for task in TASKS:
            for mode in MODES:
                cell = rows["cells"][task][mode]
                peaks = " | ".join(f"{p:,.0f}" for p in cell["peak_mib"])
                lines.append(
                    f"| {task} | {mode} | {peaks} | {cell['slope_mib_per_layer']:,.1f} | {cell['task_s'][-1]:.1f} | "
                    f"{cell['time_ratio']:.2f} |"
                )
        lines.append("")
    lines.append(f"Command: `{result['command']}` ({result['minutes']:.1f} min).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="smollm2,synthetic")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--work_dir", default=str(ROOT / "runs" / "onload_memory"))
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "onload_memory.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    parser.add_argument("--task", choices=TASKS, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    began = time.perf_counter()
    result = {"blocks": args.blocks, "seq_len": args.seq_len, "batch_size": args.batch_size, "kinds": {}}
    result["command"] = (
        "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "?") + " python benchmarks/onload_memory.py " + " ".join(sys.argv[1:])
    )
    descriptions = {"smollm2": "SmolLM2-135M, first k of 30 layers", "synthetic": "random Llama, 1.2 B parameters at 24 layers"}
    for kind in args.kinds.split(","):
        depths = DEPTHS[kind]
        cells = {task: {mode: {"peak_mib": [], "task_s": []} for mode in MODES} for task in TASKS}
        for depth in depths:
            directory = Path(args.work_dir) / f"{kind}-{depth}"
            if not (directory / "config.json").is_file():
                (build_smollm2 if kind == "smollm2" else build_synthetic)(directory, depth)
            for task in TASKS:
                for mode in MODES:
                    values = measure(directory, task, mode, args)
                    print(f"{kind} depth {depth} {task} {mode}: {values}", flush=True)
                    cells[task][mode]["peak_mib"].append(values["peak_mib"])
                    cells[task][mode]["task_s"].append(values["task_s"])
        for task in TASKS:
            for mode in MODES:
                cell = cells[task][mode]
                cell["slope_mib_per_layer"] = slope(depths, cell["peak_mib"])
                cell["time_ratio"] = cell["task_s"][-1] / cells[task]["memory"]["task_s"][-1]
        result["kinds"][kind] = {"depths": depths, "description": descriptions[kind], "cells": cells}
    result["minutes"] = (time.perf_counter() - began) / 60
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1))
    update_section("scale", "onload-memory", render(result))
    print(render(result))


if __name__ == "__main__":
    main()
