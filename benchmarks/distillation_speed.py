"""Tokens/s and peak memory of one CoMe-mp teacher-forced step (cached boundaries) vs one CoMe-sp step.

Both steps are the exact code paths of :class:`LayerwiseDistillation` (``sp_loss`` /
``mp_pair``), run on SmolLM2-135M merged 30 -> 23 layers (groups from a CoMe
``decisions.json`` when given, else a fixed 7-merge layout; timing depends only on the
architecture). Each mode runs in its own subprocess; a thread samples the resident set
size from before the warm-up step (so AdamW state and activations count) to the end of the
timed steps, and the peak above that start level is reported. For mp the boundary cache is
filled before that (it is computed once per batch; its size is reported separately), so a
step runs one merged layer forward and backward. Ratios come from the same run::

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/distillation_speed.py --steps 3
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results" / "distillation_speed.json"
DEFAULT_GROUPS = (
    [[i] for i in range(8)] + [[8, 9], [10, 11], [12, 13], [14, 15], [16, 17], [18, 19], [20, 21]] + [[i] for i in range(22, 30)]
)
PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


class PeakSampler(threading.Thread):
    """Samples the resident set size every 5 ms until stopped."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = _rss(), True

    def run(self):
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.005)


def child(mode: str, args) -> dict:
    import torch

    from lightning_prune.merging import rebuild_merged_architecture
    from lightning_prune.merging.distill import hidden_kl
    from lightning_prune.modules.distillation import LayerwiseDistillation

    torch.manual_seed(0)
    plan = json.loads(Path(args.decisions).read_text()) if args.decisions else None
    groups = next(d for d in plan["decisions"] if d["kind"] == "merge")["groups"] if plan else DEFAULT_GROUPS
    module = LayerwiseDistillation(model="demo", mode=mode, teacher_forced=mode == "mp")
    module.configure_model()
    rebuild_merged_architecture(module.model, groups)
    module.set_groups(groups)
    batch = torch.randint(0, 49152, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))
    entry = module.mapping[len(module.mapping) // 2]  # a middle merged layer for mp
    parameters = [p for p in module.model.parameters() if p.requires_grad] if mode == "sp" else list(module._layer(entry).parameters())
    optimizer = torch.optim.AdamW(parameters, lr=1e-5, weight_decay=1e-2)
    if mode == "mp":
        module.owned_layers = lambda: list(range(len(module.mapping)))
        module.boundary_cache().get(batch)

    def step():
        loss = module.sp_loss(batch) if mode == "sp" else hidden_kl(*reversed(module.mp_pair(batch, entry)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    cache_mb = module.boundary_cache().used_bytes / 2**20 if mode == "mp" else 0.0
    sampler = PeakSampler()
    before = _rss()
    sampler.start()
    step()  # warm-up (allocator, AdamW state): inside the memory window, outside the timing
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = time.perf_counter() - start
    sampler.running = False
    sampler.join()
    tokens = args.steps * batch.numel()
    return {
        "mode": mode,
        "tokens_per_second": tokens / seconds,
        "seconds_per_step": seconds / args.steps,
        "peak_rss_above_start_mb": (sampler.peak - before) / 2**20,
        "boundary_cache_mb": cache_mb,
        "merged_layers": len(module.mapping),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--decisions", default="", help="decisions.json of a CoMe merge (groups); default: fixed layout")
    parser.add_argument("--child", default="")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    rows = {}
    for mode in ("sp", "mp"):
        command = [sys.executable, __file__, "--child", mode, *(f"--{k}={v}" for k, v in vars(args).items() if k != "child")]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows[mode] = json.loads(output.strip().splitlines()[-1])
        print(rows[mode], flush=True)
    ratio = rows["mp"]["tokens_per_second"] / rows["sp"]["tokens_per_second"]
    memory = rows["mp"]["peak_rss_above_start_mb"] / max(rows["sp"]["peak_rss_above_start_mb"], 1e-9)
    import torch

    result = {
        "rows": rows,
        "mp_over_sp_tokens_per_second": ratio,
        "mp_over_sp_peak_memory": memory,
        "settings": {**vars(args), "threads": int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"mp teacher-forced / sp: {ratio:.2f}x tokens/s, {memory:.2f}x peak memory above start")
    from report import update_section

    lines = [
        "## Distillation step speed (benchmarks/distillation_speed.py)",
        "",
        f"SmolLM2-135M merged 30 -> 23, batch {args.batch_size} x {args.seq_len} tokens, {args.steps} timed steps after one warm-up, "
        f"CPU, {result['settings']['threads']} thread(s), each mode in its own process; merge groups: "
        f"{args.decisions or 'fixed layout, 7 two-layer groups over layers 8-21'} (timing depends only on the architecture); "
        "mp times the middle merged layer. The 2-core machine was shared with other jobs, so absolute rates are low; "
        "the ratio comes from one run.",
        "",
        "| step | tokens/s | s/step | peak RSS above start (MiB) | boundary cache (MiB) |",
        "|---|---|---|---|---|",
    ]
    for mode, row in rows.items():
        name = (
            "CoMe-sp (teacher + student forward, all merged layers)"
            if mode == "sp"
            else "CoMe-mp teacher-forced (cached boundary, one layer)"
        )
        lines.append(
            f"| {name} | {row['tokens_per_second']:.0f} | {row['seconds_per_step']:.2f} | {row['peak_rss_above_start_mb']:.0f} | {row['boundary_cache_mb']:.1f} |"
        )
    lines += ["", f"mp / sp: **{ratio:.1f}x** tokens/s, {memory:.2f}x peak memory above start."]
    update_section("merging", "distillation-speed", "\n".join(lines))


if __name__ == "__main__":
    main()
