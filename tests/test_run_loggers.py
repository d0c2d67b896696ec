"""Recipe loggers: CSV in run_dir/logs always, TensorBoard there too when ``tensorboard`` is importable."""

import importlib.machinery
import sys
import types

import lightning.fabric.loggers.tensorboard as fabric_tensorboard
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_prune.lightning_cli import run_loggers


def test_without_tensorboard_only_the_csv_logger(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # not importable
    loggers = run_loggers(tmp_path)
    assert [type(logger) for logger in loggers] == [CSVLogger]
    assert loggers[0].log_dir == str(tmp_path / "logs")


def test_with_tensorboard_both_log_into_run_dir_logs(monkeypatch, tmp_path):
    fake = types.ModuleType("tensorboard")
    fake.__spec__ = importlib.machinery.ModuleSpec("tensorboard", None)
    monkeypatch.setitem(sys.modules, "tensorboard", fake)
    monkeypatch.setattr(fabric_tensorboard, "_TENSORBOARD_AVAILABLE", True)  # what lightning checks on construction
    loggers = run_loggers(tmp_path)
    assert [type(logger) for logger in loggers] == [CSVLogger, TensorBoardLogger]
    assert [logger.log_dir for logger in loggers] == [str(tmp_path / "logs")] * 2
