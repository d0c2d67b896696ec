"""LoRA / QLoRA training steps: ``HealingModule`` under a Lightning ``Trainer`` vs plain peft + a PyTorch loop.

Both sides start from the same saved SmolLM2 directory, attach the same peft ``LoraConfig``
(paper 002: rank 2, alpha 2, dropout 0.05 on gate/up/down projections; QLoRA: NF4 base, double
quantisation, fp32 compute, no gradient checkpointing on either side), train on the same fixed
batch of token blocks with the same AdamW + warm-up/cosine ``LambdaLR``, fp32, for the same
number of optimizer steps. The Lightning side runs the way the healing recipes do (CSV and
TensorBoard loggers, ``log_every_n_steps=1``, progress bar; checkpointing off, since the plain
loop saves nothing either). Each side runs in its own process (so peak RSS is its own), the
sides alternate (Lightning, plain, Lightning, …) for ``--repeats`` rounds.

Throughput counts the steps after ``--warmup`` untimed ones: tokens / (time of the last step's
end - time of the last warm-up step's end), so everything between steps (data loading,
logging, the optimizer and scheduler) is inside both. Peak RSS: the process maximum
(``ru_maxrss``, includes loading) and the maximum sampled every 5 ms during the timed steps.

Writes ``benchmarks/results/healing_step.json`` and the ``healing-step`` section of
``docs/results/peers.md``::

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/healing_step.py --repeats 3
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


def lightning_side(args, loader) -> tuple[list[float], RssSampler]:
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


def plain_side(args, loader) -> tuple[list[float], RssSampler]:
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
    stamps: list[float] = []
    sampler = RssSampler()
    for batch in loader:
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        stamps.append(time.perf_counter())
        if len(stamps) == args.warmup:
            sampler.start()
    return stamps, sampler


def worker(args) -> None:
    """One side, one process: prints a JSON line with its step times and memory."""
    torch.manual_seed(args.seed)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(args.model_dir).vocab_size
    loader = fixed_loader(vocab, args.batch_size, args.seq_len, args.steps, args.seed)
    stamps, sampler = (lightning_side if args.side == "lightning" else plain_side)(args, loader)
    step_peak = sampler.stop()
    timed = len(stamps) - args.warmup
    seconds = stamps[-1] - stamps[args.warmup - 1]
    tokens = timed * args.batch_size * args.seq_len
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        "RESULT " + json.dumps({"tokens_per_s": tokens / seconds, "steps": len(stamps), "peak_rss_mb": peak, "step_peak_rss_mb": step_peak})
    )


def run_worker(args, kind: str, side: str) -> dict:
    command = [sys.executable, __file__, "--worker", "--side", side, "--kind", kind, "--model_dir", args.model_dir]
    command += [
        "--steps",
        str(args.steps),
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
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model_dir", help="a saved HF model (default: the demo model, saved to a temporary directory)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=["lightning", "plain"], help=argparse.SUPPRESS)
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
    runs = {kind: {"lightning": [], "plain": []} for kind in args.kinds.split(",")}
    for repeat in range(args.repeats):
        for kind in runs:
            for side in ("lightning", "plain"):
                runs[kind][side].append(run_worker(args, kind, side))
                r = runs[kind][side][-1]
                print(
                    f"repeat {repeat} {kind:5s} {side:9s}: {r['tokens_per_s']:.1f} tok/s, peak RSS {r['peak_rss_mb']:.0f} MB (steps {r['step_peak_rss_mb']:.0f} MB)",
                    flush=True,
                )
    rows = {}
    for kind, sides in runs.items():
        pairs = list(zip(sides["lightning"], sides["plain"]))
        rows[kind] = {
            "lightning": sides["lightning"],
            "plain": sides["plain"],
            "throughput_ratio": spread([a["tokens_per_s"] / b["tokens_per_s"] for a, b in pairs]),
            "peak_rss_ratio": spread([a["peak_rss_mb"] / b["peak_rss_mb"] for a, b in pairs]),
            "step_peak_rss_ratio": spread([a["step_peak_rss_mb"] / b["step_peak_rss_mb"] for a, b in pairs]),
        }
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
    print(
        json.dumps(
            {k: {m: r[m]["median"] for m in ("throughput_ratio", "peak_rss_ratio", "step_peak_rss_ratio")} for k, r in rows.items()},
            indent=2,
        )
    )

    def median(row, side, key):
        return statistics.median(run[key] for run in row[side])

    table = []
    for kind, row in rows.items():
        t, p, s = row["throughput_ratio"], row["peak_rss_ratio"], row["step_peak_rss_ratio"]
        table.append(
            f"| {'LoRA' if kind == 'lora' else 'QLoRA (NF4)'} | {median(row, 'lightning', 'tokens_per_s'):.1f} | {median(row, 'plain', 'tokens_per_s'):.1f} "
            f"| **{t['median']:.3f}** ({t['min']:.3f}–{t['max']:.3f}) | {median(row, 'lightning', 'peak_rss_mb'):.0f} / {median(row, 'plain', 'peak_rss_mb'):.0f} "
            f"| {p['median']:.3f} | {median(row, 'lightning', 'step_peak_rss_mb'):.0f} / {median(row, 'plain', 'step_peak_rss_mb'):.0f} | {s['median']:.3f} |"
        )
    tokens = args.batch_size * args.seq_len
    update_section(
        "peers",
        "healing-step",
        f"""
## Healing step: `HealingModule` under Lightning vs plain peft (`benchmarks/healing_step.py`)

SmolLM2-135M fp32, CPU ({result["settings"]["torch_threads"]} thread, shared 2-core machine), the same peft `LoraConfig`
(rank 2, alpha 2, dropout 0.05, gate/up/down), the same fixed batch of {args.batch_size}×{args.seq_len} = {tokens} tokens,
AdamW (lr 3e-4) + the same warm-up/cosine schedule, fp32, {args.steps} optimizer steps of which the first {args.warmup} are
not timed; each side in its own process, alternating, {args.repeats} rounds (ratios per round: median and range).
Lightning side as the recipes run it (CSV + TensorBoard loggers, `log_every_n_steps=1`, progress bar), checkpointing
off on both sides. Target: throughput ratio ≥ 0.95.

| | Lightning tok/s | plain tok/s | Lightning / plain (range) | peak RSS MB (process) L / plain | ratio | peak RSS MB (timed steps) L / plain | ratio |
|---|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(table)}

Command:

    OMP_NUM_THREADS=1 python benchmarks/healing_step.py --repeats {args.repeats} --steps {args.steps} --warmup {args.warmup} --batch_size {args.batch_size} --seq_len {args.seq_len}
""",
    )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
