"""Data-parallel sparsity calibration (2 CPU processes, gloo) equals one process on all the blocks.

The test runs this file as a script once per rank: each rank plans every configuration on its
shard of the calibration blocks (``blocks[rank::2]``, as ``StageCallback`` shards them) with a
``reduce`` that all-reduces sums. One block per batch, so each block's activations are computed
alike in both runs and the only difference left is the order of the fp64 sums.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve()
WORLD = 2
CONFIGS = [("wanda", "uniform"), ("wanda", "dlp"), ("wanda", "owl"), ("sparsegpt", "uniform"), ("sparsegpt", "dlp")]


def blocks() -> torch.Tensor:
    from conftest import random_ids

    return random_ids(8, 24, seed=5)


def plan_all(calibration: torch.Tensor, reduce=None) -> dict:
    """Every configuration planned on a fresh tiny Llama: masks, per-layer sparsity, weights, signature."""
    from conftest import make_tiny_model

    from lightning_prune.sparsity.masks import prunable_linears
    from lightning_prune.stages import identity_reduce
    from lightning_prune.stages.sparsify import SparsifyStage

    results = {}
    for method, allocation in CONFIGS:
        model = make_tiny_model("llama")
        decision = SparsifyStage(method=method, allocation=allocation, sparsity=0.5, batch_size=1).plan(
            model, calibration, reduce=reduce or identity_reduce, progress=False
        )
        results[f"{method}+{allocation}"] = {
            "masks": dict(decision.masks),
            "layer_sparsity": decision.record["layer_sparsity"],
            "measured": decision.record["measured"]["per_layer"],
            "weights": {name: linear.weight.detach().clone() for name, linear in prunable_linears(model)},
            "signature": decision.signature(),
        }
    return results


def rank_main(rank: int, init_file: str, output: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)

    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    torch.save(plan_all(blocks()[rank::WORLD], reduce), Path(output) / f"rank{rank}.pt")
    dist.destroy_process_group()


def run_ranks(tmp_path: Path, timeout: int = 240) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    init = tmp_path / "init"
    processes = [
        subprocess.Popen(
            [sys.executable, str(HERE), str(rank), str(init), str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        for rank in range(WORLD)
    ]
    for process in processes:
        try:
            _, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in processes:
                os.killpg(other.pid, signal.SIGKILL)
            pytest.fail(f"{WORLD}-process sparsity calibration did not finish in {timeout} s")
        assert process.returncode == 0, stderr[-3000:]
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]


def test_two_ranks_choose_the_masks_of_one_process_on_all_blocks(tmp_path):
    ranks = run_ranks(tmp_path)
    single = plan_all(blocks())
    half = plan_all(blocks()[0::WORLD])  # what rank 0 would choose without the all-reduce
    differs_without_reduce = []
    for config, expected in single.items():
        for rank in ranks:
            got = rank[config]
            assert got["layer_sparsity"] == expected["layer_sparsity"], config
            assert got["measured"] == expected["measured"], config
            assert got["masks"].keys() == expected["masks"].keys()
            for name, mask in expected["masks"].items():
                assert torch.equal(got["masks"][name], mask), f"{config} {name}"
            for name, weight in expected["weights"].items():  # SparseGPT's OBS updates too
                torch.testing.assert_close(got["weights"][name], weight, rtol=0, atol=1e-6, msg=f"{config} {name}")
            assert got["signature"] == expected["signature"]  # the checksum StageCallback compares across ranks
        differs_without_reduce.append(any(not torch.equal(half[config]["masks"][n], m) for n, m in expected["masks"].items()))
    assert all(differs_without_reduce)  # the shards alone would have chosen other masks


if __name__ == "__main__":
    rank_main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
