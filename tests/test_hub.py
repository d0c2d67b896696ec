"""``--push_to_hub``: credentials checked before any work; the model and its card uploaded (Hub faked at HTTP)."""

import pytest
from conftest import assert_one_line_error, run_cli
from fake_hub import fake_hub

from lightning_prune.errors import InputError
from lightning_prune.hub import check_push


@pytest.fixture
def hub(monkeypatch):
    yield from fake_hub(monkeypatch)


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored login either
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))


def test_prune_pushes_the_model_with_its_card(hub, tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        capsys, "prune", "--model", tiny_dir, "--layers", "2", "--seq_len", 32, "--output_dir", out, "--push_to_hub", "me/tiny"
    )
    assert code == 0, err
    assert hub.created == [{"name": "tiny", "organization": "me", "type": "model", "authorization": "Bearer hf_test_token"}]
    assert len(hub.commits) == 1 and hub.commits[0]["path"] == "/api/models/me/tiny/commit/main"
    sent = hub.commits[0]["files"]
    saved = {p.name: p.read_bytes() for p in (out / "model").iterdir()}
    assert sent == saved  # every file of model/, byte for byte, README.md included
    assert b"prune: remove layers [2]" in sent["README.md"]
    assert '"hub_commit": "https://huggingface.co/me/tiny/commit/1"' in stdout


@pytest.mark.parametrize("command", [["prune", "--layers", "2"], ["merge", "--num_layers", "1"], ["sparsify", "--method", "magnitude"]])
def test_missing_credentials_fail_before_any_work(no_token, command, tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, command[0], "--model", tiny_dir, *command[1:], "--output_dir", out, "--push_to_hub", "me/tiny")
    assert_one_line_error(code, err, "--push_to_hub 'me/tiny' needs Hub credentials: set HF_TOKEN or run `hf auth login`")
    assert not out.exists()


def test_apply_checks_credentials_before_reading_the_plan(no_token, tmp_path, capsys):
    code, _, err = run_cli(capsys, "apply", "--plan", tmp_path / "absent.json", "--output_dir", tmp_path / "run", "--push_to_hub", "me/x")
    assert_one_line_error(code, err, "needs Hub credentials")


def test_a_malformed_repo_id_is_refused(hub):
    with pytest.raises(InputError, match="is not a Hub repo id"):
        check_push("me/bad repo")
    check_push("me/good-repo")
    assert hub.requests == []  # checking talks to nobody


def test_a_recipe_checks_credentials_before_any_work(no_token, tiny_dir, tmp_path, capsys):
    run = tmp_path / "run"
    options = [
        "--config",
        "prune_heal",
        "--run_dir",
        run,
        "--model.init_args.model",
        tiny_dir,
        "--prune.num_layers",
        1,
        "--push_to_hub",
        "me/tiny",
    ]
    code, _, err = run_cli(capsys, "fit", *options)
    assert_one_line_error(code, err, "--push_to_hub 'me/tiny' needs Hub credentials")
    assert not (run / "decisions.json").exists() and not (run / "model").exists()
