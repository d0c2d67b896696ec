import json

import pytest
import torch
from conftest import make_tiny_model

from lightning_prune.data.tasks import encode_items, load_task
from lightning_prune.errors import InputError
from lightning_prune.evaluation.harness import evaluate_tasks, resolve_tasks


@torch.no_grad()
def reference_accuracy(model, tokenizer, task: str, limit: int) -> tuple[float, float]:
    """acc / acc_norm by hand: summed log-probability of each continuation, arg-max (norm: / chars)."""
    items = load_task(task, limit=limit)
    correct = correct_norm = 0
    for item, encoded in zip(items, encode_items(tokenizer, items)):
        scores = []
        for continuation in encoded.continuations:
            ids = torch.cat([encoded.context, continuation])
            logprobs = model(input_ids=ids[None, :-1]).logits[0].float().log_softmax(-1)
            positions = torch.arange(len(encoded.context) - 1, len(ids) - 1)
            scores.append(logprobs[positions, continuation].sum().item())
        lengths = [len(choice) for choice in item.choices]
        correct += max(range(len(scores)), key=scores.__getitem__) == item.gold
        correct_norm += max(range(len(scores)), key=lambda i: scores[i] / lengths[i]) == item.gold
    return correct / len(items), correct_norm / len(items)


def test_harness_equals_hand_computed_loglikelihood_accuracy(tiny_tokenizer):
    model = make_tiny_model("llama")
    result = evaluate_tasks(model, tiny_tokenizer, ["arc_easy"], limit=24, batch_size=4)
    scores = result["tasks"]["arc_easy"]
    acc, acc_norm = reference_accuracy(model, tiny_tokenizer, "arc_easy", 24)
    assert scores["num_items"] == 24
    assert scores["acc"] == pytest.approx(acc) and scores["acc_norm"] == pytest.approx(acc_norm)
    settings = result["settings"]
    assert settings["limit"] == 24 and settings["num_fewshot"] == 0 and settings["batch_size"] == 4
    assert settings["prompt_format"]["target_delimiter"] == " " and settings["task_files"]["arc_easy"].endswith("arc_easy.jsonl")
    assert not model.training  # left as it was


def write_task(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_user_task_dir_and_fewshot(tmp_path, tiny_tokenizer):
    records = [{"query": f"Question: what follows {n}?\nAnswer:", "choices": [str(n + 1), str(n + 7)], "gold": 0} for n in range(6)]
    write_task(tmp_path / "counting.jsonl", records)
    model = make_tiny_model("llama")
    result = evaluate_tasks(model, tiny_tokenizer, ["counting"], task_dir=str(tmp_path), num_fewshot=2)
    assert result["tasks"]["counting"]["num_items"] == 6
    assert 0 <= result["tasks"]["counting"]["acc"] <= 1
    assert result["settings"]["num_fewshot"] == 2


def test_bad_tasks_are_named(tmp_path):
    write_task(tmp_path / "broken.jsonl", [{"query": "q", "choices": ["a", "b"]}])
    with pytest.raises(InputError, match="lacks field 'gold'"):
        resolve_tasks(["broken"], str(tmp_path))
    with pytest.raises(
        InputError, match="task 'hellaswagg' is not bundled .*, not in lm-eval's registry \\(did you mean 'hellaswag'\\?\\)"
    ):
        resolve_tasks(["hellaswagg"])
    with pytest.raises(InputError, match="is not a directory"):
        resolve_tasks(["arc_easy"], str(tmp_path / "nowhere"))
    with pytest.raises(InputError, match="limit 0 must be a positive"):
        evaluate_tasks(torch.nn.Linear(1, 1), None, ["arc_easy"], limit=0)


def test_cli_evaluate_with_tasks(capsys, tiny_dir, tmp_path):
    from test_cli import assert_one_line_error, run_cli

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_task(tasks / "mine.jsonl", [{"query": f"Question: {n}?", "choices": ["yes", "no"], "gold": n % 2} for n in range(5)])
    args = [
        "evaluate",
        "--model",
        tiny_dir,
        "--seq_len",
        32,
        "--eval_samples",
        2,
        "--tasks",
        "arc_easy,mine",
        "--task_dir",
        tasks,
        "--limit",
        4,
    ]
    code, out, err = run_cli(capsys, *args, "--output_dir", tmp_path / "run")
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {name: scores["num_items"] for name, scores in metrics["tasks"].items()} == {"arc_easy": 4, "mine": 4}
    assert metrics["settings"]["harness"]["limit"] == 4 and metrics["settings"]["tasks"] == "arc_easy,mine"
    assert metrics["perplexity"]["wikitext2"] > 1
    write_task(tasks / "bad.jsonl", [{"query": "q", "gold": 0}])
    for extra, fragment in (
        (["--tasks", "bad", "--task_dir", tasks], "lacks field 'choices'"),
        (["--tasks", "piqa", "--limit", 0], "limit 0 must be"),
    ):
        code, _, err = run_cli(capsys, "evaluate", "--model", tiny_dir, *extra, "--output_dir", tmp_path / "bad_run")
        assert_one_line_error(code, err, fragment)
        assert not (tmp_path / "bad_run").exists()


def test_registry_tasks_resolve_by_name_and_fail_offline_in_one_line(monkeypatch, tiny_tokenizer):
    from conftest import make_tiny_model

    files = resolve_tasks(["piqa", "hellaswag"])
    assert files["hellaswag"] is None and files["piqa"].name == "piqa.jsonl"
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="lm-eval could not load the data of --tasks hellaswag: .*local datasets cache"):
        evaluate_tasks(make_tiny_model("llama"), tiny_tokenizer, ["hellaswag"], limit=2)
