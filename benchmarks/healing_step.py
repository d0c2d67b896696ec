"""LoRA / QLoRA training steps: ``HealingModule`` under a Lightning ``Trainer`` vs plain peft + a PyTorch loop.

Both sides start from the same saved SmolLM2 directory, attach the same peft ``LoraConfig``
(paper 002: rank 2, alpha 2, dropout 0.05 on gate/up/down projections; QLoRA: NF4 base, double
quantisation, fp32 compute, no gradient checkpointing on either side), train on the same fixed
batch of token blocks with the same AdamW + warm-up/cosine ``LambdaLR``, fp32, for the same
number of optimizer steps. The Lightning side runs the way the healing recipes do (CSV and
TensorBoard loggers, ``log_every_n_steps=1``, progress bar; checkpointing off, since the plain
loop saves nothing either).

Throughput: both sides in one process, their steps alternating (the plain step runs inside a
Lightning callback and is timed apart), so both see the same load of the shared machine; a
Lightning step is timed from the end of the previous plain step to its ``on_train_batch_end``,
so data loading, logging and the progress bar are inside it. The first ``--warmup`` steps are
not timed. Memory: each side alone in its own process, peak RSS as the process maximum
(``ru_maxrss``, includes loading) and as the maximum sampled every 5 ms during the timed steps.

Writes ``benchmarks/results/healing_step.json`` and the ``healing-step`` section of
``docs/results/peers.md``::

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/healing_step.py
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT_HERE = Path(__file__).resolve().parent
RESULTS = ROOT_HERE / "results" / "healing_step.json"


class RssSampler:
    """Maximum resident set size (MB) seen while running, sampled from ``/proc/self/status``."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with open("/proc/self/status") as status:
                rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
            self.peak = max(self.peak, rss / 1024)
            time.sleep(self.interval)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def fixed_loader(vocab: int, batch_size: int, seq_len: int, steps: int, seed: int):
    """A DataLoader yielding the same (B, T) block batch ``steps`` times."""
    generator = torch.Generator().manual_seed(seed)
    batch = torch.randint(0, vocab, (batch_size, seq_len), generator=generator)
    return torch.utils.data.DataLoader([batch] * steps, batch_size=None, shuffle=False)


def lightning_side(args, loader, after_step=None) -> tuple[list[float], RssSampler]:
    """``HealingModule`` under a ``Trainer`` set up like the recipes'; ``after_step`` runs in ``on_train_batch_end``."""
    import lightning as L

    from lightning_prune.lightning_cli import run_loggers
    from lightning_prune.modules.healing import HealingModule

    stamps: list[float] = []
    sampler = RssSampler()

    class Stamp(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            stamps.append(time.perf_counter())
            if len(stamps) == args.warmup:
                sampler.start()
            if after_step is not None:
                after_step(batch)
                stamps[-1] = (stamps[-1], time.perf_counter())  # (end of this step, start of the next one)

    module = HealingModule(model=args.model_dir, quantize="nf4" if args.kind == "qlora" else None, learning_rate=3e-4, warmup_steps=1)
    run_dir = Path(tempfile.mkdtemp(prefix="healing-step-"))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=args.steps,
        logger=run_loggers(run_dir),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[Stamp()],
        default_root_dir=str(run_dir),
    )
    trainer.fit(module, train_dataloaders=loader)
    return stamps, sampler


def plain_setup(args):
    """The same model, peft ``LoraConfig``, AdamW and schedule, by hand; returns ``step(batch)``."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lightning_prune.modules.optim import warmup_cosine

    if args.kind == "qlora":
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32
        )
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, quantization_config=quantization, dtype=torch.float32)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=2, lora_alpha=2, lora_dropout=0.05, target_modules=["gate_proj", "up_proj", "down_proj"], bias="none", task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup_steps=1, total_steps=args.steps))

    def step(batch: torch.Tensor) -> None:
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()

    return step


def plain_side(args, loader) -> tuple[list[float], RssSampler]:
    step = plain_setup(args)
    stamps: list[float] = []
    sampler = RssSampler()
    for batch in loader:
        step(batch)
        stamps.append(time.perf_counter())
        if len(stamps) == args.warmup:
            sampler.start()
    return stamps, sampler


def memory_worker(args, loader) -> dict:
    """One side alone in this process: its peak RSS (and its throughput, exposed to the machine's load)."""
    stamps, sampler = (lightning_side if args.side == "lightning" else plain_side)(args, loader)
    step_peak = sampler.stop()
    seconds = stamps[-1] - stamps[args.warmup - 1]
    tokens = (len(stamps) - args.warmup) * args.batch_size * args.seq_len
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"tokens_per_s": tokens / seconds, "steps": len(stamps), "peak_rss_mb": peak, "step_peak_rss_mb": step_peak}


def interleaved_worker(args, loader) -> dict:
    """Both sides in this process, steps alternating (Lightning, plain, Lightning, …).

    A Lightning step is timed from the end of the previous plain step to its ``on_train_batch_end``
    (so data loading, logging and the progress bar are inside it); the plain step right after it.
    """
    plain_step = plain_setup(args)
    plain_seconds: list[float] = []

    def after_step(batch: torch.Tensor) -> None:
        start = time.perf_counter()
        plain_step(batch)
        plain_seconds.append(time.perf_counter() - start)

    stamps, sampler = lightning_side(args, loader, after_step)
    sampler.stop()
    lightning_seconds = [end - previous[1] for previous, (end, _) in zip(stamps, stamps[1:])]
    timed = slice(args.warmup - 1, None)  # step index args.warmup onwards (the first interval is step 1)
    return {"lightning_step_seconds": lightning_seconds[timed], "plain_step_seconds": plain_seconds[args.warmup :]}


def worker(args) -> None:
    """One measurement in this process: prints a JSON line."""
    torch.manual_seed(args.seed)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(args.model_dir).vocab_size
    loader = fixed_loader(vocab, args.batch_size, args.seq_len, args.steps, args.seed)
    result = interleaved_worker(args, loader) if args.side == "interleaved" else memory_worker(args, loader)
    print("RESULT " + json.dumps(result))


def run_worker(args, kind: str, side: str, steps: int) -> dict:
    command = [sys.executable, __file__, "--worker", "--side", side, "--kind", kind, "--model_dir", args.model_dir]
    command += [
        "--steps",
        str(steps),
        "--warmup",
        str(args.warmup),
        "--batch_size",
        str(args.batch_size),
        "--seq_len",
        str(args.seq_len),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{kind}/{side} failed:\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="lora,qlora")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps of the interleaved run, warm-up included")
    parser.add_argument("--memory_steps", type=int, default=5, help="optimizer steps of each memory run")
    parser.add_argument("--memory_rounds", type=int, default=1, help="rounds of one-side-per-process memory runs")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model_dir", help="a saved HF model (default: the demo model, saved to a temporary directory)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=["lightning", "plain", "interleaved"], help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=["lora", "qlora"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.model_dir is None:
        from lightning_prune.model.loading import load_model

        model, tokenizer = load_model("demo")
        args.model_dir = tempfile.mkdtemp(prefix="healing-step-model-")
        model.save_pretrained(args.model_dir)
        tokenizer.save_pretrained(args.model_dir)
        del model
    rows = {}
    for kind in args.kinds.split(","):
        steps = run_worker(args, kind, "interleaved", args.steps)
        ratios = [p / q for q, p in zip(steps["lightning_step_seconds"], steps["plain_step_seconds"])]
        memory = {"lightning": [], "plain": []}
        for _ in range(args.memory_rounds):
            for side in memory:
                memory[side].append(run_worker(args, kind, side, args.memory_steps))
        pairs = list(zip(memory["lightning"], memory["plain"]))
        rows[kind] = {
            **steps,
            "step_ratio": spread(ratios),  # plain step time / Lightning step time, per adjacent pair
            "throughput_ratio": sum(steps["plain_step_seconds"]) / sum(steps["lightning_step_seconds"]),
            # other jobs only ever slow a step down: the fastest step of each side is its least disturbed one
            "best_ratio": min(steps["plain_step_seconds"]) / min(steps["lightning_step_seconds"]),
            "memory_runs": memory,
            "peak_rss_ratio": spread([a["peak_rss_mb"] / b["peak_rss_mb"] for a, b in pairs]),
            "step_peak_rss_ratio": spread([a["step_peak_rss_mb"] / b["step_peak_rss_mb"] for a, b in pairs]),
        }
        print(kind, json.dumps({k: rows[kind][k] for k in ("step_ratio", "throughput_ratio", "peak_rss_ratio")}), flush=True)
    write(args, rows)


def write(args, rows: dict) -> None:
    sys.path.insert(0, str(ROOT_HERE))
    from report import update_section

    from lightning_prune.results import package_versions

    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "side", "kind", "model_dir")}
    result = {
        "model": "SmolLM2-135M (demo GGUF, fp32)",
        "settings": {**settings, "torch_threads": torch.get_num_threads()},
        "rows": rows,
        "versions": package_versions(),
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    tokens = args.batch_size * args.seq_len

    def median(row, side, key):
        return statistics.median(run[key] for run in row["memory_runs"][side])

    table = []
    for kind, row in rows.items():
        r, p, s = row["step_ratio"], row["peak_rss_ratio"], row["step_peak_rss_ratio"]
        lightning = tokens / statistics.median(row["lightning_step_seconds"])
        plain = tokens / statistics.median(row["plain_step_seconds"])
        table.append(
            f"| {'LoRA' if kind == 'lora' else 'QLoRA (NF4)'} | {lightning:.1f} | {plain:.1f} | **{r['median']:.3f}** ({r['min']:.3f}–{r['max']:.3f}) "
            f"| {row['throughput_ratio']:.3f} | {row['best_ratio']:.3f} | {median(row, 'lightning', 'peak_rss_mb'):.0f} / {median(row, 'plain', 'peak_rss_mb'):.0f} "
            f"| {p['median']:.3f} | {median(row, 'lightning', 'step_peak_rss_mb'):.0f} / {median(row, 'plain', 'step_peak_rss_mb'):.0f} | {s['median']:.3f} |"
        )
    timed = args.steps - args.warmup
    update_section(
        "peers",
        "healing-step",
        f"""
## Healing step: `HealingModule` under Lightning vs plain peft (`benchmarks/healing_step.py`)

SmolLM2-135M fp32, CPU ({result["settings"]["torch_threads"]} thread, shared 2-core machine), the same peft `LoraConfig`
(rank 2, alpha 2, dropout 0.05, gate/up/down; QLoRA: NF4, double quantisation, fp32 compute, no gradient
checkpointing on either side), the same fixed batch of {args.batch_size}×{args.seq_len} = {tokens} tokens, AdamW (lr 3e-4) + the
same warm-up/cosine schedule, fp32. The Lightning side runs as the recipes do (CSV + TensorBoard loggers,
`log_every_n_steps=1`, progress bar; checkpointing off on both sides).

Throughput: both sides in one process, steps alternating (Lightning step, plain step, …; the plain loop runs inside a
callback, outside the Lightning step's timing), {args.steps} steps each, the first {args.warmup} untimed, so both sides
see the same load of the shared machine. "Step ratio" = plain step time / Lightning step time per adjacent pair
(median and range of {timed} pairs; > 1: Lightning faster); "total" = summed plain / summed Lightning time; "best" =
fastest plain step / fastest Lightning step (the least disturbed step of each). Memory: each side
alone in its own process ({args.memory_rounds} round(s), {args.memory_steps} steps): the process's peak RSS (loading included; the
QLoRA Lightning side quantises through a save/reload of the fp32 model) and the peak sampled during the timed steps.
Target: throughput ratio ≥ 0.95.

| | Lightning tok/s | plain tok/s | step ratio (range) | total | best | peak RSS MB (process) L / plain | ratio | peak RSS MB (timed steps) L / plain | ratio |
|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(table)}

Command:

    OMP_NUM_THREADS=1 python benchmarks/healing_step.py --steps {args.steps} --warmup {args.warmup} --memory_steps {args.memory_steps} --memory_rounds {args.memory_rounds} --batch_size {args.batch_size} --seq_len {args.seq_len}
""",
    )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
