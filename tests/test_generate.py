"""``lightning-prune generate`` and ``chat`` on the tiny model: the output is exactly ``model.generate``'s."""

import io

import pytest
import torch
from conftest import assert_one_line_error, run_cli
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_prune.commands.chat import conversation_ids


@pytest.fixture
def tiny(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir).eval(), AutoTokenizer.from_pretrained(tiny_dir)


def reference(model, tokenizer, ids: torch.Tensor, new: int, **sampling) -> str:
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, pad_token_id=tokenizer.pad_token_id, **sampling)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_greedy_generate_prints_model_generate_decoded(tiny_dir, tiny, capsys):
    model, tokenizer = tiny
    prompt = "The history of the city"
    code, out, err = run_cli(capsys, "generate", "--model", tiny_dir, "--prompt", prompt, "--max_new_tokens", 12, "--device", "cpu")
    assert code == 0, err
    expected = reference(model, tokenizer, tokenizer(prompt, return_tensors="pt").input_ids, 12, do_sample=False)
    assert expected.strip() and out == expected + "\n"


def test_sampling_is_seeded(tiny_dir, tiny, capsys):
    model, tokenizer = tiny
    options = ["--prompt", "In 1990", "--max_new_tokens", 10, "--temperature", 1.5, "--top_p", 0.9, "--seed", 3]
    code, out, err = run_cli(capsys, "generate", "--model", tiny_dir, *options)
    assert code == 0, err
    torch.manual_seed(3)
    ids = tokenizer("In 1990", return_tensors="pt").input_ids
    assert out == reference(model, tokenizer, ids, 10, do_sample=True, temperature=1.5, top_p=0.9) + "\n"


def test_chat_answers_each_line_with_the_conversation_so_far_and_stops_at_exit(tiny_dir, tiny, capsys, monkeypatch):
    model, tokenizer = tiny
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\n\nwhat next\n/exit\nnever read\n"))
    code, out, err = run_cli(capsys, "chat", "--model", tiny_dir, "--max_new_tokens", 6)
    assert code == 0, err
    first = reference(model, tokenizer, tokenizer("hello there\n", return_tensors="pt").input_ids, 6, do_sample=False)
    history = f"hello there\n{first}\nwhat next\n"  # no chat template: the turns concatenated
    second = reference(model, tokenizer, tokenizer(history, return_tensors="pt").input_ids, 6, do_sample=False)
    assert out == f"{first}\n{second}\n"


def test_chat_ends_at_end_of_input(tiny_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    code, out, err = run_cli(capsys, "chat", "--model", tiny_dir)
    assert (code, out) == (0, "") and "/exit" in err


def test_chat_uses_the_tokenizer_chat_template(tiny_tokenizer):
    tokenizer = tiny_tokenizer
    tokenizer.chat_template = (
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    try:
        ids = conversation_ids(tokenizer, [{"role": "user", "content": "hi"}])
    finally:
        tokenizer.chat_template = None
    assert ids.tolist() == [tokenizer("[user]hi[assistant]").input_ids]


@pytest.mark.parametrize(
    "options, fragment",
    [
        (["--temperature", -1], "temperature must be >= 0"),
        (["--top_p", 0], "top_p must be in (0, 1]"),
        (["--max_new_tokens", 0], "max_new_tokens must be >= 1"),
    ],
)
def test_bad_sampling_options_fail_before_the_model_loads(tmp_path, capsys, options, fragment):
    missing = tmp_path / "no-such-model"  # loading would fail differently: the check comes first
    code, _, err = run_cli(capsys, "generate", "--model", missing, "--prompt", "x", *options)
    assert_one_line_error(code, err, fragment)
