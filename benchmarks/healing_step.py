"""LoRA / QLoRA training steps: ``HealingModule`` under a Lightning ``Trainer`` vs plain peft + a PyTorch loop.

Both sides start from the same saved SmolLM2 directory, attach the same peft ``LoraConfig``
(paper 002: rank 2, alpha 2, dropout 0.05 on gate/up/down projections; QLoRA: NF4 base, double
quantisation, fp32 compute, no gradient checkpointing on either side), train on the same fixed
batch of token blocks with the same AdamW + warm-up/cosine ``LambdaLR``, fp32, for the same
number of optimizer steps. The Lightning side runs the way the healing recipes do (CSV and
TensorBoard loggers, ``log_every_n_steps=1``, progress bar; checkpointing off, since the plain
loop saves nothing either).

Throughput: both sides in one process, one plain step next to every Lightning step (run by a
Lightning callback and timed apart): after it on even steps, before it on odd ones, so neither side
always follows the other. Every step is timed three ways: wall clock, CPU time of the process (all
its threads: the TensorBoard writer's included) and CPU time of the main thread. A Lightning step
is the time between two ``on_train_batch_end`` calls minus the plain step run in between, so data
loading, logging and the progress bar are inside it. Per adjacent pair, ratio = plain time /
Lightning time (> 1: Lightning faster); reported as median, quartiles and a bootstrap 95 %
interval of the median over the pairs. CPU time is what decides: other jobs on the shared machine
stretch wall time, not the CPU work of a step. Verdict: ``meets`` when the interval's lower end is
>= the target, ``misses`` when its upper end is below it, else ``undecided``.

Attribution (``--profile_steps``): another process runs the same interleaved steps under two
``cProfile`` profilers (CPU-time clock), one switched on during the Lightning steps, the other
during the plain steps; the Lightning profile's time in code of lightning / torchmetrics /
tensorboard / tqdm / the module is the step overhead, an upper bound (the profiler slows Python
code, not kernels). Memory: each side alone in its own process, peak RSS as the process maximum
(``VmHWM`` of the worker process, includes loading) and as the maximum sampled every 5 ms during the timed steps.

Writes ``benchmarks/results/healing_step.json`` and the ``healing-step`` section of
``docs/results/peers.md``::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/healing_step.py --steps 42 --warmup 2 --profile_steps 6
"""

import argparse
import cProfile
import json
import os
import pstats
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from process_memory import peak_rss_mb

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


def now() -> tuple[float, float, float]:
    """(wall, process CPU, main-thread CPU) seconds."""
    return time.perf_counter(), time.process_time(), time.thread_time()


def lightning_side(args, loader, callbacks=()) -> None:
    """``HealingModule`` under a ``Trainer`` set up like the recipes'; ``callbacks`` added to the recipe's."""
    import lightning as L

    from lightning_prune.lightning_cli import run_loggers
    from lightning_prune.modules.healing import HealingModule

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
        callbacks=list(callbacks),
        default_root_dir=str(run_dir),
    )
    trainer.fit(module, train_dataloaders=loader)


def memory_lightning_side(args, loader) -> tuple[list[float], RssSampler]:
    import lightning as L

    stamps: list[float] = []
    sampler = RssSampler()

    class Stamp(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            stamps.append(time.perf_counter())
            if len(stamps) == args.warmup:
                sampler.start()

    lightning_side(args, loader, [Stamp()])
    return stamps, sampler


def memory_worker(args, loader) -> dict:
    """One side alone in this process: its peak RSS (and its throughput, exposed to the machine's load)."""
    stamps, sampler = (memory_lightning_side if args.side == "lightning" else plain_side)(args, loader)
    step_peak = sampler.stop()
    seconds = stamps[-1] - stamps[args.warmup - 1]
    tokens = (len(stamps) - args.warmup) * args.batch_size * args.seq_len
    peak = peak_rss_mb()
    return {"tokens_per_s": tokens / seconds, "steps": len(stamps), "peak_rss_mb": peak, "step_peak_rss_mb": step_peak}


def interleaved_worker(args, loader, profilers: dict | None = None) -> dict:
    """Both sides in this process: a plain step after every even Lightning step and before every odd one.

    Returns per-step (wall, process CPU, thread CPU) seconds of each side. With ``profilers``
    (``{"lightning": Profile, "plain": Profile}``) each profiler runs only during its side's steps.
    """
    import lightning as L

    plain_step = plain_setup(args)
    plain_times: list[tuple[float, float, float]] = []
    ends: list[tuple[float, float, float]] = []  # the Lightning clock (time minus plain time) at each on_train_batch_end
    inside = [0.0, 0.0, 0.0]  # plain time so far

    def run_plain(batch) -> None:
        if profilers:
            profilers["lightning"].disable()
            profilers["plain"].enable()
        start = now()
        plain_step(batch)
        end = now()
        if profilers:
            profilers["plain"].disable()
            profilers["lightning"].enable()
        plain_times.append(tuple(b - a for a, b in zip(start, end)))
        for k in range(3):
            inside[k] += end[k] - start[k]

    def clock() -> tuple[float, float, float]:
        return tuple(t - p for t, p in zip(now(), inside))

    class Pair(L.Callback):
        def on_train_start(self, trainer, pl_module):
            ends.append(clock())
            if profilers:
                profilers["lightning"].enable()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx % 2 == 1:
                run_plain(batch)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            ends.append(clock())
            if batch_idx % 2 == 0:
                run_plain(batch)

        def on_train_end(self, trainer, pl_module):
            if profilers:
                profilers["lightning"].disable()

    lightning_side(args, loader, [Pair()])
    lightning_times = [tuple(b - a for a, b in zip(first, second)) for first, second in zip(ends, ends[1:])]
    timed = slice(args.warmup, None)
    names = ("wall", "cpu", "thread_cpu")
    return {
        "lightning": {name: [t[k] for t in lightning_times[timed]] for k, name in enumerate(names)},
        "plain": {name: [t[k] for t in plain_times[timed]] for k, name in enumerate(names)},
        "plain_first": [i % 2 == 1 for i in range(len(plain_times))][timed],
    }


OVERHEAD_PATHS = ("/lightning/", "/lightning_fabric/", "/torchmetrics/", "/tensorboard", "/tqdm/", "/lightning_prune/")


def _profile_summary(profile: cProfile.Profile, steps: int, top: int = 15) -> dict:
    """CPU seconds per step: total, in framework code (lightning, torchmetrics, tensorboard, tqdm, the module), top functions."""
    stats = pstats.Stats(profile).stats
    total = sum(entry[2] for entry in stats.values()) / steps  # tottime
    framework = sum(entry[2] for (path, _, _), entry in stats.items() if any(p in path for p in OVERHEAD_PATHS)) / steps
    ranked = sorted(stats.items(), key=lambda item: -item[1][2])[:top]
    functions = [
        {"function": f"{Path(path).name}:{line}({name})" if path != "~" else name, "tottime_per_step": entry[2] / steps}
        for (path, line, name), entry in ranked
    ]
    return {"total_per_step": total, "framework_per_step": framework, "top": functions}


def profile_worker(args, loader) -> dict:
    profilers = {"lightning": cProfile.Profile(time.process_time), "plain": cProfile.Profile(time.process_time)}
    times = interleaved_worker(args, loader, profilers)
    steps = args.steps  # every step of each side is profiled (warm-up included)
    return {"profile": {side: _profile_summary(profilers[side], steps) for side in profilers}, "times": times}


def worker(args) -> None:
    """One measurement in this process: prints a JSON line."""
    torch.manual_seed(args.seed)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(args.model_dir).vocab_size
    loader = fixed_loader(vocab, args.batch_size, args.seq_len, args.steps, args.seed)
    if args.side == "interleaved":
        result = interleaved_worker(args, loader)
    elif args.side == "profile":
        result = profile_worker(args, loader)
    else:
        result = memory_worker(args, loader)
    result["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(result))


def run_worker(args, kind: str, side: str, steps: int) -> dict:
    command = [sys.executable, __file__, "--worker", "--side", side, "--kind", kind, "--model_dir", args.model_dir]
    command += ["--steps", str(steps), "--warmup", str(args.warmup), "--batch_size", str(args.batch_size), "--seq_len", str(args.seq_len)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{kind}/{side} failed:\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ratio_summary(ratios: list[float], target: float, seed: int = 0, resamples: int = 4000) -> dict:
    """Median, quartiles, 10/90 % and range of per-pair ratios, a bootstrap 95 % interval of the median, and the verdict."""
    generator = random.Random(seed)
    medians = sorted(statistics.median(generator.choices(ratios, k=len(ratios))) for _ in range(resamples))
    low, high = medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]
    verdict = "meets" if low >= target else "misses" if high < target else "undecided"
    return {
        "pairs": len(ratios),
        "median": statistics.median(ratios),
        "ci95": [low, high],
        "q25": _quantile(ratios, 0.25),
        "q75": _quantile(ratios, 0.75),
        "q10": _quantile(ratios, 0.10),
        "q90": _quantile(ratios, 0.90),
        "min": min(ratios),
        "max": max(ratios),
        "verdict": verdict,
        "values": ratios,
    }


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="lora,qlora")
    parser.add_argument("--steps", type=int, default=42, help="optimizer steps of the interleaved run, warm-up included")
    parser.add_argument("--profile_steps", type=int, default=0, help="optimizer steps of the profiled run (0: no profile)")
    parser.add_argument("--memory_steps", type=int, default=5, help="optimizer steps of each memory run")
    parser.add_argument("--memory_rounds", type=int, default=1, help="rounds of one-side-per-process memory runs")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model_dir", help="a saved HF model (default: the demo model, saved to a temporary directory)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=["lightning", "plain", "interleaved", "profile"], help=argparse.SUPPRESS)
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
        row = {"steps": steps}
        for clock in ("wall", "cpu", "thread_cpu"):
            pairs = zip(steps["plain"][clock], steps["lightning"][clock])
            row[f"ratio_{clock}"] = ratio_summary([p / q for p, q in pairs], args.target, args.seed)
            row[f"total_{clock}"] = sum(steps["plain"][clock]) / sum(steps["lightning"][clock])
        if args.profile_steps:
            row["profile"] = run_worker(args, kind, "profile", args.profile_steps)["profile"]
        memory = {"lightning": [], "plain": []}
        for _ in range(args.memory_rounds):
            for side in memory:
                memory[side].append(run_worker(args, kind, side, args.memory_steps))
        pairs = list(zip(memory["lightning"], memory["plain"]))
        row["memory_runs"] = memory
        row["peak_rss_ratio"] = spread([a["peak_rss_mb"] / b["peak_rss_mb"] for a, b in pairs])
        row["step_peak_rss_ratio"] = spread([a["step_peak_rss_mb"] / b["step_peak_rss_mb"] for a, b in pairs])
        rows[kind] = row
        print(
            kind, json.dumps({k: {m: row[k][m] for m in ("median", "ci95", "verdict")} for k in row if k.startswith("ratio_")}), flush=True
        )
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

    def cell(r):
        return f"**{r['median']:.3f}** [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] ({r['q25']:.3f}–{r['q75']:.3f}; {r['min']:.3f}–{r['max']:.3f}) {r['verdict']}"

    names = {"lora": "LoRA", "qlora": "QLoRA (NF4)"}
    table, memory_table, profile_table = [], [], []
    for kind, row in rows.items():
        steps = row["steps"]
        cpu_l, cpu_p = statistics.median(steps["lightning"]["cpu"]), statistics.median(steps["plain"]["cpu"])
        table.append(
            f"| {names[kind]} | {tokens / cpu_l:.1f} / {tokens / cpu_p:.1f} | {cell(row['ratio_cpu'])} | {row['total_cpu']:.3f} "
            f"| {cell(row['ratio_thread_cpu'])} | {cell(row['ratio_wall'])} | {row['total_wall']:.3f} |"
        )
        p = row["peak_rss_ratio"]
        s = row["step_peak_rss_ratio"]
        memory_table.append(
            f"| {names[kind]} | {median(row, 'lightning', 'peak_rss_mb'):.0f} / {median(row, 'plain', 'peak_rss_mb'):.0f} | {p['median']:.3f} "
            f"| {median(row, 'lightning', 'step_peak_rss_mb'):.0f} / {median(row, 'plain', 'step_peak_rss_mb'):.0f} | {s['median']:.3f} |"
        )
        if "profile" in row:
            lp, pp = row["profile"]["lightning"], row["profile"]["plain"]
            top = ", ".join(f"`{f['function']}` {1000 * f['tottime_per_step']:.0f}" for f in lp["top"][:4])
            profile_table.append(
                f"| {names[kind]} | {lp['total_per_step']:.2f} / {pp['total_per_step']:.2f} | {1000 * lp['framework_per_step']:.0f} "
                f"| {lp['framework_per_step'] / lp['total_per_step']:.2%} | {top} |"
            )
    timed = args.steps - args.warmup
    profile_text = (
        f"""
Where a Lightning step's CPU time goes (`cProfile`, CPU clock, {args.profile_steps} interleaved steps per side, another process):
"framework" = self time in lightning, lightning_fabric, torchmetrics, tensorboard, tqdm and `lightning_prune` code (the loop,
logging, progress bar, loggers, the module), an upper bound since the profiler slows Python code and not the kernels.

| | CPU s per step (profiled) L / plain | framework ms per step | share | largest self times in the Lightning steps (ms per step) |
|---|---:|---:|---:|---|
{chr(10).join(profile_table)}
"""
        if profile_table
        else ""
    )
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

Throughput: both sides in one process, {args.steps} steps each ({args.warmup} untimed), one plain step next to every Lightning step
(after it on even steps, before it on odd ones; run by a callback, timed apart), each step timed by the wall clock, by the
process's CPU time (all threads) and by the main thread's CPU time. Ratio = plain step time / Lightning step time per
adjacent pair ({timed} pairs; > 1: Lightning faster): **median** [bootstrap 95 % interval of the median] (quartiles; range)
and the verdict against the target {args.target} (meets: interval above it; misses: interval below it). "total" = summed
plain / summed Lightning time. CPU time decides: load from other jobs stretches the wall clock of a step, not its CPU work.

| | tok/s per CPU-second L / plain | CPU ratio | CPU total | main-thread CPU ratio | wall ratio | wall total |
|---|---:|---:|---:|---:|---:|---:|
{chr(10).join(table)}
{profile_text}
Memory: each side alone in its own process ({args.memory_rounds} round(s), {args.memory_steps} steps): the process's peak RSS (loading
included; the QLoRA Lightning side quantises through a save/reload of the fp32 model) and the peak sampled during the
timed steps.

| | peak RSS MB (process) L / plain | ratio | peak RSS MB (timed steps) L / plain | ratio |
|---|---:|---:|---:|---:|
{chr(10).join(memory_table)}

Command:

    OMP_NUM_THREADS=1 python benchmarks/healing_step.py --steps {args.steps} --warmup {args.warmup} --profile_steps {args.profile_steps} --memory_steps {args.memory_steps} --memory_rounds {args.memory_rounds} --batch_size {args.batch_size} --seq_len {args.seq_len}
""",
    )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
