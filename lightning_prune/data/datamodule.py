"""``TextDataModule``: token blocks for training, validation and calibration.

Training order is resumable mid-epoch: the shuffle is a ``DistributedSampler`` (so Lightning
keeps it under DDP instead of wrapping it; each rank takes its share unless the trainer has
``shard: false``) seeded by ``seed + epoch``, and when a fit restores a
checkpoint taken inside an epoch, the first pass skips the batches that epoch already trained
on. A resumed run therefore sees exactly the batches an uninterrupted run sees.
"""

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_prune.data.text import load_blocks
from lightning_prune.model.loading import load_tokenizer

__all__ = ["TextDataModule"]


class TextDataModule(L.LightningDataModule):
    """Fixed-length token blocks from text sources (see :mod:`lightning_prune.data.text`).

    Args:
        tokenizer: model name whose tokenizer to use ('demo', Hub id, directory, .gguf).
        train_data: source of training and calibration blocks (wikitext2, c4, a file).
        train_split: split of ``train_data`` (validation by default: WikiText-2 test stays unseen).
        val_data: source of validation blocks.
        val_split: split of ``val_data``.
        seq_len: tokens per block.
        num_train_samples: training blocks (``None``: every block of the split).
        num_val_samples: validation blocks (the first ones of the split).
        calibration_samples: blocks drawn at random (seeded) for pruning/merging calibration.
        batch_size: blocks per batch and device.
        seed: seed of calibration sampling and training-order shuffling.
        shard: under DDP each rank trains on its share of the blocks; false: every rank sees every
            batch (teacher-forced mp distillation spreads layers, not data, over ranks).
    """

    def __init__(
        self,
        tokenizer: str = "demo",
        train_data: str = "wikitext2",
        train_split: str = "validation",
        val_data: str = "wikitext2",
        val_split: str = "test",
        seq_len: int = 128,
        num_train_samples: int | None = None,
        num_val_samples: int = 64,
        calibration_samples: int = 64,
        batch_size: int = 4,
        seed: int = 0,
        shard: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters()
        self._tokenizer = None
        self.train_blocks = self.val_blocks = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.hparams.tokenizer)
        return self._tokenizer

    def _blocks(self, source: str, split: str, num_samples: int | None, seed: int | None, option: str) -> torch.Tensor:
        hp = self.hparams
        return load_blocks(
            self.tokenizer, source, split=split, seq_len=hp.seq_len, num_samples=num_samples, seed=seed, option=f"data.init_args.{option}"
        )

    def setup(self, stage: str) -> None:
        hp = self.hparams
        if stage == "fit" and self.train_blocks is None:
            self.train_blocks = self._blocks(hp.train_data, hp.train_split, hp.num_train_samples, hp.seed, "num_train_samples")
        if stage in ("fit", "validate") and self.val_blocks is None:
            self.val_blocks = self._blocks(hp.val_data, hp.val_split, hp.num_val_samples, None, "num_val_samples")

    def calibration_blocks(self) -> torch.Tensor:
        """``calibration_samples`` distinct blocks of the training split, drawn with ``seed``."""
        hp = self.hparams
        return self._blocks(hp.train_data, hp.train_split, hp.calibration_samples, hp.seed, "calibration_samples")

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        dataset = _Blocks(self.train_blocks)
        world, rank = _shard(self.trainer, hp.shard)
        sampler = ResumableShuffle(dataset, num_replicas=world, rank=rank, seed=hp.seed)
        sampler.skip = _batches_done_this_epoch(self.trainer) * hp.batch_size
        return _ResumableLoader(dataset, batch_size=hp.batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Blocks(self.val_blocks), batch_size=self.hparams.batch_size)


class ResumableShuffle(DistributedSampler):
    """Seeded shuffle (``seed + epoch``, this rank's share) whose next pass can skip its first ``skip`` items.

    ``len`` stays the full epoch: Lightning counts the skipped batches as already done.
    """

    def __init__(self, dataset, *, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.skip = 0

    def __iter__(self):
        order = list(super().__iter__())
        start, self.skip = self.skip, 0
        return iter(order[start:])


class _ResumableLoader(DataLoader):
    """A DataLoader that tells Lightning it resumes mid-epoch (its state lives in the trainer's
    progress counters, read by :func:`_batches_done_this_epoch`), so no "not resumable" warning."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _shard(trainer: L.Trainer | None, shard: bool) -> tuple[int, int]:
    """(replicas, rank) of this process's share: the whole set when the trainer is told not to
    shard (``shard: false``, e.g. teacher-forced mp distillation on several ranks)."""
    if trainer is None or not shard:
        return 1, 0
    return trainer.world_size, trainer.global_rank


def _batches_done_this_epoch(trainer: L.Trainer | None) -> int:
    """Batches of the current epoch that a restored fit already trained on (0 unless resumed mid-epoch)."""
    if trainer is None:
        return 0
    fit_loop = trainer.fit_loop
    epoch, batches = fit_loop.epoch_progress.current, fit_loop.epoch_loop.batch_progress
    inside_epoch = epoch.started > epoch.processed and not batches.is_last_batch
    return batches.current.processed if inside_epoch else 0


class _Blocks(TensorDataset):
    """Dataset of token blocks whose items are plain (T,) tensors, batched to (B, T)."""

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.tensors[0][index]
