import json

import pytest
import torch

from lightning_prune.data.datamodule import TextDataModule
from lightning_prune.data.text import data_key, load_blocks, read_text, token_blocks, tokenize_text
from lightning_prune.errors import InputError, MissingInputError


def test_blocks_are_consecutive_from_the_start():
    ids = torch.arange(100)
    blocks = token_blocks(ids, 16, 3)
    assert blocks.shape == (3, 16)
    assert torch.equal(blocks.flatten(), torch.arange(48))
    assert token_blocks(ids, 16).shape == (6, 16)


def test_seeded_sampling_is_deterministic_and_distinct():
    ids = torch.arange(1000)
    first = token_blocks(ids, 10, 20, seed=3)
    assert torch.equal(first, token_blocks(ids, 10, 20, seed=3))
    assert not torch.equal(first, token_blocks(ids, 10, 20, seed=4))
    starts = first[:, 0].tolist()
    assert len(set(starts)) == 20 and all(start % 10 == 0 for start in starts)


@pytest.mark.parametrize(
    "seq_len, num_samples, message",
    [(0, 1, "positive"), (10, 11, "yields: 10 blocks"), (200, None, "fewer than one block"), (10, 0, "positive")],
)
def test_block_errors(seq_len, num_samples, message):
    with pytest.raises(InputError, match=message):
        token_blocks(torch.arange(100), seq_len, num_samples)


def test_read_shortcuts_and_files(tmp_path):
    assert read_text("wikitext2", "test").startswith(" \n = Robert Boulter = \n")
    assert "Homarus gammarus" in read_text("wikitext2", "validation")[:5000]
    assert len(read_text("c4", "validation")) > 1_000_000
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text(json.dumps({"text": "alpha"}) + "\n\n" + json.dumps({"text": "beta"}) + "\n")
    assert read_text(str(jsonl)) == "alpha\n\nbeta"
    text = tmp_path / "notes.txt"
    text.write_text("some words")
    assert read_text(str(text)) == "some words"
    assert data_key(str(text)) == "notes" and data_key("wikitext2") == "wikitext2"


def test_read_errors(tmp_path):
    with pytest.raises(MissingInputError, match="does not exist"):
        read_text(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(InputError, match="is empty"):
        read_text(str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "x"}\n')
    with pytest.raises(InputError, match="no 'text' field"):
        read_text(str(bad))
    with pytest.raises(InputError, match="split"):
        read_text("wikitext2", "train")


def test_tokenize_once_without_special_tokens(tiny_tokenizer):
    ids = tokenize_text(tiny_tokenizer, "hello world")
    assert ids.tolist() == tiny_tokenizer("hello world", add_special_tokens=False)["input_ids"]
    blocks = load_blocks(tiny_tokenizer, "wikitext2", split="test", seq_len=32, num_samples=4)
    whole = tokenize_text(tiny_tokenizer, read_text("wikitext2", "test"))
    assert torch.equal(blocks.flatten(), whole[:128])


def test_datamodule_batches_and_calibration(tiny_dir):
    data = TextDataModule(tokenizer=str(tiny_dir), seq_len=32, num_train_samples=10, num_val_samples=6, calibration_samples=5, batch_size=4)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch.shape == (4, 32) and batch.dtype == torch.long
    assert [len(b) for b in data.val_dataloader()] == [4, 2]
    calibration = data.calibration_blocks()
    assert calibration.shape == (5, 32)
    assert torch.equal(calibration, data.calibration_blocks())


@pytest.mark.parametrize("shard", [True, False])
def test_train_loader_gives_each_rank_its_share_unless_told_not_to(tiny_dir, monkeypatch, shard):
    import lightning as L

    monkeypatch.setattr(L.Trainer, "world_size", property(lambda self: 2))
    orders = []
    for rank in (0, 1):
        monkeypatch.setattr(L.Trainer, "global_rank", property(lambda self, rank=rank: rank))
        data = TextDataModule(tokenizer=str(tiny_dir), seq_len=16, num_train_samples=8, batch_size=2, seed=3, shard=shard)
        data.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)
        data.setup("fit")
        orders.append([tuple(block.tolist()) for batch in data.train_dataloader() for block in batch])
    every_block = {tuple(block.tolist()) for block in data.train_blocks}
    if shard:
        assert len(orders[0]) == len(orders[1]) == 4
        assert not set(orders[0]) & set(orders[1]) and set(orders[0]) | set(orders[1]) == every_block
    else:
        assert orders[0] == orders[1] and set(orders[0]) == every_block and len(orders[0]) == 8
