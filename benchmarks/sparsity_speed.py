"""Time and peak memory of magnitude / Wanda / SparseGPT sparsification on SmolLM2.

Each method runs in its own subprocess (so peak resident memory is its own): the model is
loaded, calibration blocks drawn, then ``sparsify`` (uniform 50 %) is timed while a thread
samples the resident set size; the peak above the pre-run level is reported. Ratios to
magnitude are computed from the same run. Writes ``benchmarks/results/sparsity_speed.json``
(``benchmarks/sparsity_evidence.py`` renders it into ``docs/results/sparsity.md``)::

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/sparsity_speed.py --calibration_samples 8
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
RESULTS = ROOT / "benchmarks" / "results" / "sparsity_speed.json"
METHODS = ("magnitude", "wanda", "sparsegpt")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


class PeakMemory:
    """Sample the resident set size every 5 ms while the ``with`` block runs."""

    def __enter__(self):
        self.start = self.peak = _rss()
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while self._running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, _rss())


def measure_one(method: str, samples: int, seq_len: int) -> dict:
    """Load SmolLM2, sparsify it with ``method`` (uniform 50 %) and return time and memory."""
    from lightning_prune.data.text import load_blocks
    from lightning_prune.model.loading import load_model
    from lightning_prune.sparsity import measure_sparsity, sparsify

    model, tokenizer = load_model("demo")
    blocks = load_blocks(tokenizer, "c4", split="validation", seq_len=seq_len, num_samples=samples, seed=0)
    with PeakMemory() as memory:
        start = time.perf_counter()
        sparsify(model, blocks, method=method, allocation="uniform", sparsity=0.5, progress=False)
        seconds = time.perf_counter() - start
    return {
        "method": method,
        "seconds": seconds,
        "peak_extra_mib": (memory.peak - memory.start) / 2**20,
        "measured_sparsity": measure_sparsity(model)["overall"],
        "tokens": samples * seq_len,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration_samples", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one, args.calibration_samples, args.seq_len)))
        return
    rows = []
    for method in METHODS:
        command = [
            sys.executable,
            __file__,
            "--one",
            method,
            "--calibration_samples",
            str(args.calibration_samples),
            "--seq_len",
            str(args.seq_len),
        ]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    base = rows[0]["seconds"]
    for row in rows:
        row["time_vs_magnitude"] = row["seconds"] / base
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"settings": vars(args), "threads": os.environ.get("OMP_NUM_THREADS"), "rows": rows}, indent=2) + "\n")
    for row in rows:
        print(f"{row['method']:10s} {row['seconds']:7.1f} s  x{row['time_vs_magnitude']:.1f}  peak +{row['peak_extra_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
