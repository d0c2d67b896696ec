"""Run directories: a killed run's temporaries and marked results are cleaned; a failed run leaves the previous state."""

import os

import pytest

from lightning_prune.run_state import MARKER, clean_stale, guarded_output, recover
from lightning_prune.validation.locations import check_output_location


def test_clean_stale_removes_only_our_temporaries(tmp_path):
    (tmp_path / ".model.ab12").mkdir()
    (tmp_path / ".model.ab12" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / ".metrics.json.x9").write_text("{")
    (tmp_path / ".gitignore").write_text("*")
    (tmp_path / "notes.txt").write_text("mine")
    assert sorted(clean_stale(tmp_path)) == [".metrics.json.x9", ".model.ab12"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".gitignore", "notes.txt"]


def test_recover_removes_the_results_of_a_marked_run_and_keeps_other_files(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "decisions.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    assert not recover(tmp_path) and (tmp_path / "model").exists()
    (tmp_path / MARKER).write_text("")
    assert recover(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_failed_command_removes_the_directory_it_created(tmp_path):
    target = tmp_path / "new" / "run"
    with pytest.raises(ValueError), guarded_output(str(target)):
        (target / "metrics.json").write_text("{}")
        raise ValueError("bad")
    assert not (tmp_path / "new").exists()


def test_a_failure_before_any_write_keeps_previous_results_unmarked(tmp_path):
    (tmp_path / "metrics.json").write_text('{"old": 1}')
    with pytest.raises(ValueError), guarded_output(str(tmp_path), overwrite=True):
        assert (tmp_path / MARKER).exists()
        raise ValueError("bad")
    assert not (tmp_path / MARKER).exists() and (tmp_path / "metrics.json").read_text() == '{"old": 1}'


def test_a_failure_after_a_write_leaves_the_directory_marked(tmp_path):
    (tmp_path / "metrics.json").write_text('{"old": 1}')
    with pytest.raises(ValueError), guarded_output(str(tmp_path), overwrite=True):
        (tmp_path / "model").mkdir()
        raise ValueError("bad")
    assert (tmp_path / MARKER).exists()
    with guarded_output(str(tmp_path)):
        assert not (tmp_path / "model").exists() and not (tmp_path / "metrics.json").exists()
    assert not (tmp_path / MARKER).exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_an_unwritable_output_location_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(ValueError, match="cannot be written"):
        check_output_location(locked / "run")
