"""Peak resident memory of the running process, as the benchmarks report it."""

from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak resident set (``VmHWM``: resident pages, mapped files included), in MiB.

    Not ``getrusage``'s ``ru_maxrss``: Linux carries it over ``fork`` and ``execve``, so a worker
    process would report its benchmark parent's resident set whenever that was the larger one.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")
