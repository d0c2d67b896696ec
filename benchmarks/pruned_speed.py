"""Speed of pruned and merged SmolLM2 models against the dense one, and the 2:4 export's size, in one run.

Builds, through the command line, a 23/30-layer model pruned by Block Influence and a
23-layer CoMe-merged model, plus a uniform 2:4 magnitude-sparse ``--export_format compressed``
export; saves the dense model the same way (plain ``save_pretrained``). Every model is then
loaded with plain ``transformers`` and timed, interleaved (dense, pruned, merged, dense, …):

- decode: greedy ``generate`` with the KV cache, fixed prompt, exactly ``--new_tokens`` new
  tokens (``min_new_tokens`` = ``max_new_tokens``);
- prefill: one no-grad forward of ``--prefill_batch`` x ``--prefill_len`` tokens.

Speed-ups are per repeat (dense time / model time of the same repeat), median and range
printed. Two ideals: L/L′ (decoder layers only) and the linear-layer multiply-add ratio that
also counts the LM head, which pruning keeps (the 49k-token head is a large share of a 135M
model); attention-score FLOPs, which grow with the context, are left out of both.

Writes ``benchmarks/results/pruned_speed.json`` and the ``pruned-speed`` section of
``docs/results/peers.md``::

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/pruned_speed.py --repeats 5
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from report import ROOT, update_section
from transformers import AutoModelForCausalLM

from lightning_prune.model.loading import load_model
from lightning_prune.results import package_versions

RESULTS = ROOT / "benchmarks" / "results" / "pruned_speed.json"
CLI = str(Path(sys.executable).parent / "lightning-prune")
PROMPT = "The history of the printing press begins"


def build(directory: Path, calibration_samples: int, num_layers: int) -> dict[str, list[str]]:
    """Run the three commands; returns each command line (for the report)."""
    common = ["--model", "demo", "--dtype", "float32", "--device", "cpu", "--seq_len", "128", "--eval_samples", "1"]
    calibration = ["--calibration_samples", str(calibration_samples)]
    commands = {
        "pruned": [CLI, "prune", "--metric", "bi", "--num_layers", str(num_layers), *calibration, *common, "--output_dir", str(directory / "pruned")],
        "merged": [CLI, "merge", "--num_layers", str(num_layers), *calibration, *common, "--output_dir", str(directory / "merged")],
        "sparse_2:4": [
            CLI, "sparsify", "--method", "magnitude", "--allocation", "uniform", "--structure", "2:4", "--export_format", "compressed",
            *calibration, *common, "--output_dir", str(directory / "sparse"),
        ],
    }  # fmt: skip
    for name, command in commands.items():
        if (Path(command[-1]) / "model" / "config.json").exists():
            print(f"reusing {name} in {command[-1]}", flush=True)
            continue
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{name}: {' '.join(command)} failed:\n{done.stderr[-3000:]}")
        print(f"built {name} in {time.perf_counter() - start:.0f} s", flush=True)
    return commands


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def linear_flops(model) -> tuple[int, int]:
    """Multiply-adds per token of (the decoder layers' linear layers, the LM head)."""
    layers = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    return layers, model.get_output_embeddings().weight.numel()


@torch.no_grad()
def decode_seconds(model, prompt: torch.Tensor, new_tokens: int, pad_id: int) -> float:
    start = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=pad_id)
    seconds = time.perf_counter() - start
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return seconds


@torch.no_grad()
def prefill_seconds(model, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(ids, use_cache=False)
    return time.perf_counter() - start


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_layers", type=int, default=7, help="layers removed / merged away (30 → 23)")
    parser.add_argument("--calibration_samples", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--prefill_batch", type=int, default=4)
    parser.add_argument("--prefill_len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--work_dir", help="where the models are built (default: a new temporary directory); models already there are reused"
    )
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="pruned-speed-"))
    dense, tokenizer = load_model("demo")
    if not (work / "dense" / "config.json").exists():
        dense.save_pretrained(work / "dense")
    del dense
    commands = build(work, args.calibration_samples, args.num_layers)
    paths = {"dense": work / "dense", "pruned": work / "pruned" / "model", "merged": work / "merged" / "model"}
    models = {name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval() for name, path in paths.items()}
    layers = {name: m.config.num_hidden_layers for name, m in models.items()}
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    prefill = torch.randint(0, dense_vocab := models["dense"].config.vocab_size, (args.prefill_batch, args.prefill_len))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for model in models.values():  # warm-up, not timed
        decode_seconds(model, prompt, 4, pad_id)
        prefill_seconds(model, prefill[:1, :32])
    times = {name: {"decode": [], "prefill": []} for name in models}
    for repeat in range(args.repeats):
        for name, model in models.items():
            times[name]["decode"].append(decode_seconds(model, prompt, args.new_tokens, pad_id))
            times[name]["prefill"].append(prefill_seconds(model, prefill))
        print(f"repeat {repeat}: " + ", ".join(f"{n} {t['decode'][-1]:.2f}/{t['prefill'][-1]:.2f} s" for n, t in times.items()), flush=True)
    prefill_tokens = args.prefill_batch * args.prefill_len
    rows = {}
    for name, model in models.items():
        row = {
            "layers": layers[name],
            "decode_tokens_per_s": spread([args.new_tokens / s for s in times[name]["decode"]]),
            "prefill_tokens_per_s": spread([prefill_tokens / s for s in times[name]["prefill"]]),
            "ideal_layers": layers["dense"] / layers[name],
            # per token, decode and prefill alike: every linear layer once and the head once
            "ideal_flops": sum(linear_flops(models["dense"])) / sum(linear_flops(model)),
        }
        for phase in ("decode", "prefill"):
            row[f"speedup_{phase}"] = spread([d / m for d, m in zip(times["dense"][phase], times[name][phase])])
            # other jobs only ever slow a run down: the fastest of each model is its least disturbed time
            row[f"best_speedup_{phase}"] = min(times["dense"][phase]) / min(times[name][phase])
            row[f"of_ideal_layers_{phase}"] = row[f"best_speedup_{phase}"] / row["ideal_layers"]
            row[f"of_ideal_flops_{phase}"] = row[f"best_speedup_{phase}"] / row["ideal_flops"]
        rows[name] = row
    sizes = {
        "dense_bytes": directory_bytes(paths["dense"]),
        "pruned_bytes": directory_bytes(paths["pruned"]),
        "merged_bytes": directory_bytes(paths["merged"]),
        "sparse_2_4_compressed_bytes": directory_bytes(work / "sparse" / "model"),
    }
    sizes["sparse_over_dense"] = sizes["sparse_2_4_compressed_bytes"] / sizes["dense_bytes"]
    embedding = models["dense"].get_input_embeddings().weight
    sizes["dense_embedding_bytes"] = embedding.numel() * embedding.element_size()  # kept dense by the 2:4 export (tied head)
    sizes["sparse_over_dense_without_embedding"] = (sizes["sparse_2_4_compressed_bytes"] - sizes["dense_embedding_bytes"]) / (
        sizes["dense_bytes"] - sizes["dense_embedding_bytes"]
    )
    dense_layers, dense_head = linear_flops(models["dense"])
    result = {
        "model": "SmolLM2-135M (demo GGUF, fp32)",
        "settings": {
            **{k: v for k, v in vars(args).items() if k != "work_dir"},
            "torch_threads": torch.get_num_threads(),
            "prompt": PROMPT,
            "prompt_tokens": prompt.shape[1],
            "vocab": dense_vocab,
        },
        "commands": {name: " ".join(c).replace(CLI, "lightning-prune").replace(str(work), "$TMP") for name, c in commands.items()},
        "models": rows,
        "head_share_of_linear_flops_per_token": dense_head / (dense_layers + dense_head),
        "sizes": sizes,
        "versions": package_versions(),
    }
    summary = {n: {k: r[k] for k in r if k.startswith(("of_ideal", "best"))} for n, r in rows.items() if n != "dense"}
    print(json.dumps({"summary": summary, "sizes": sizes}, indent=2))
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    write_section(result, args)


def write_section(result: dict, args) -> None:
    rows, sizes = result["models"], result["sizes"]
    lines = [
        "| model | layers | decode tok/s (best) | decode speed-up: median (range), best | prefill tok/s (best) | prefill speed-up: median (range), best | ideal L/L′ | ideal with head | decode best: of L/L′ / of head-ideal | prefill best: of L/L′ / of head-ideal |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        d, p = r["speedup_decode"], r["speedup_prefill"]
        lines.append(
            f"| {name} | {r['layers']} | {r['decode_tokens_per_s']['max']:.1f} | {d['median']:.3f} ({d['min']:.3f}–{d['max']:.3f}), **{r['best_speedup_decode']:.3f}** "
            f"| {r['prefill_tokens_per_s']['max']:.0f} | {p['median']:.3f} ({p['min']:.3f}–{p['max']:.3f}), **{r['best_speedup_prefill']:.3f}** | {r['ideal_layers']:.3f} "
            f"| {r['ideal_flops']:.3f} | {r['of_ideal_layers_decode']:.2f} / {r['of_ideal_flops_decode']:.2f} "
            f"| {r['of_ideal_layers_prefill']:.2f} / {r['of_ideal_flops_prefill']:.2f} |"
        )
    mb = 1e6
    commands = "\n".join(f"    {c}" for c in result["commands"].values())
    update_section(
        "peers",
        "pruned-speed",
        f"""
## Pruned-model speed against the dense model (`benchmarks/pruned_speed.py`)

What a user gets from removing 7 of 30 layers, measured with plain `transformers` on the saved
models (fp32, CPU, {result["settings"]["torch_threads"]} thread, shared 2-core machine; {args.repeats} interleaved repeats,
speed-up = dense time / model time of the same repeat, median and range; "best" = the fastest dense
run / the fastest run of the model: other jobs on the machine only ever slow a run down, so the
fastest of each is its least disturbed time, and the "of ideal" columns use it). Decode: greedy
`generate` with KV cache, a {result["settings"]["prompt_tokens"]}-token prompt, exactly {args.new_tokens} new tokens.
Prefill: one forward of {args.prefill_batch}×{args.prefill_len} tokens. Target: ≥ 0.9 × L/L′.

{chr(10).join(lines)}

The LM head (49,152 × 576, tied to the embeddings) is {result["head_share_of_linear_flops_per_token"]:.0%} of the dense
model's linear-layer multiply-adds per token and is not removed by pruning, so the achievable
speed-up is the "ideal with head" column (linear-layer FLOPs, dense / pruned), not L/L′.

| saved weights (safetensors) | MB | / dense |
|---|---:|---:|
| dense (`save_pretrained`) | {sizes["dense_bytes"] / mb:.1f} | 1.00 |
| pruned 23 layers | {sizes["pruned_bytes"] / mb:.1f} | {sizes["pruned_bytes"] / sizes["dense_bytes"]:.2f} |
| merged 23 layers | {sizes["merged_bytes"] / mb:.1f} | {sizes["merged_bytes"] / sizes["dense_bytes"]:.2f} |
| 2:4 magnitude, `--export_format compressed` | {sizes["sparse_2_4_compressed_bytes"] / mb:.1f} | {sizes["sparse_over_dense"]:.2f} |

The 2:4 export stores only the decoder's linear weights sparse; the tied embedding / LM head
({sizes["dense_embedding_bytes"] / mb:.1f} MB) stays dense. Without it the export is
{sizes["sparse_over_dense_without_embedding"]:.2f}× the dense bytes (half the values plus the bitmask).

Commands (the models are built in a temporary directory):

    OMP_NUM_THREADS=1 python benchmarks/pruned_speed.py --repeats {args.repeats} --new_tokens {args.new_tokens} --prefill_batch {args.prefill_batch} --prefill_len {args.prefill_len}
{commands}
""",
    )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
