"""Start-up time of ``lightning-prune --help`` and each subcommand's ``--help``, against a baseline commit in the same run.

The baseline tree is checked out in a temporary git worktree; both trees run as
``python -c "from lightning_prune.cli import main; main()"`` from their own root, so each
imports its own package. Floors (``python -c pass``, ``import torch``, ``import lightning``)
show what no change to this package can remove. Writes ``benchmarks/results/startup.json``
and the ``startup`` section of ``docs/results/usability.md``.

    python benchmarks/startup_speed.py --baseline 46845cd --repeats 5
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import ROOT, update_section

COMMANDS = [["--help"], ["prune", "--help"], ["merge", "--help"], ["sparsify", "--help"], ["evaluate", "--help"], ["score", "--help"]]
FLOORS = {"python -c pass": "pass", "import torch": "import torch", "import lightning": "import lightning"}


def _seconds(argv: list[str], cwd: Path, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, cwd=cwd, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return times


def _cli(arguments: list[str]) -> list[str]:
    return [
        sys.executable,
        "-c",
        f"import sys; sys.argv = ['lightning-prune', *{arguments!r}]; from lightning_prune.cli import main; main()",
    ]


def _stats(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": times}


def measure(baseline: str, repeats: int) -> dict:
    """Median and minimum wall time per command for this tree and the baseline commit, plus the floors."""
    with tempfile.TemporaryDirectory(prefix="startup-baseline-") as directory:
        old = Path(directory) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(old), baseline], check=True)
        try:
            rows = {}
            for arguments in COMMANDS:
                label = "lightning-prune " + " ".join(arguments)
                rows[label] = {
                    "current": _stats(_seconds(_cli(arguments), ROOT, repeats)),
                    "baseline": _stats(_seconds(_cli(arguments), old, repeats)),
                }
            rows["lightning-prune fit --help"] = {"current": _stats(_seconds(_cli(["fit", "--help"]), ROOT, repeats))}
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=True)
    floors = {label: _stats(_seconds([sys.executable, "-c", code], ROOT, repeats)) for label, code in FLOORS.items()}
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"baseline": baseline, "current": head, "repeats": repeats, "commands": rows, "floors": floors}


def render(result: dict) -> str:
    """Markdown table: median seconds now and at the baseline, and their ratio."""
    lines = [
        f"Median of {result['repeats']} runs, this tree ({result['current']}) against {result['baseline']}, same run, 2-core CPU.",
        f"Command: `python benchmarks/startup_speed.py --baseline {result['baseline']} --repeats {result['repeats']}`.",
        "",
        "| command | now s | baseline s | now / baseline |",
        "|---|---|---|---|",
    ]
    for label, row in result["commands"].items():
        now = row["current"]["median_s"]
        if "baseline" in row:
            before = row["baseline"]["median_s"]
            lines.append(f"| `{label}` | {now:.2f} | {before:.2f} | {now / before:.2f} |")
        else:
            lines.append(f"| `{label}` | {now:.2f} | | |")
    lines += ["", "| floor | median s |", "|---|---|"]
    lines += [f"| `{label}` | {row['median_s']:.2f} |" for label, row in result["floors"].items()]
    lines += [
        "",
        "The one-shot commands build only the chosen subcommand's parser and import transformers and",
        "matplotlib on first use; what remains is mostly `import torch`. `fit --help` is the",
        "LightningCLI's: `import lightning` alone (it imports all of torchmetrics and torch._dynamo) is",
        "above the 3 s goal, so that one stays over it.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="46845cd", help="git commit to compare with (default: before the start-up work)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "startup.json"))
    args = parser.parse_args()
    result = measure(args.baseline, args.repeats)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    text = render(result)
    update_section("usability", "startup", text)
    print(text)


if __name__ == "__main__":
    main()
