"""``lightning-prune chat``: a short interactive loop with a (pruned) model on stdin/stdout."""

import sys

import torch

from lightning_prune.commands.common import load_checked_model
from lightning_prune.commands.generate import check_sampling, complete

__all__ = ["chat", "conversation_ids"]

EXIT = "/exit"


def conversation_ids(tokenizer, messages: list[dict]) -> torch.Tensor:
    """(1, T) prompt ids: the tokenizer's chat template when it has one, else the turns' text concatenated."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        return ids["input_ids"]
    text = "".join(message["content"] + "\n" for message in messages)
    return tokenizer(text, return_tensors="pt").input_ids


def chat(
    model: str = "demo",
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    dtype: str = "auto",
    device: str = "auto",
) -> None:
    """Chat with a model: each stdin line is a user turn, answered on stdout; EOF or /exit ends.

    Args:
        model: 'demo', a Hub id, a local model directory (a run's model/) or a .gguf file.
        max_new_tokens: tokens per answer at most.
        temperature: sampling temperature; 0 is greedy decoding.
        top_p: nucleus sampling: the smallest set of tokens with this probability mass (with temperature > 0).
        seed: seed of the sampling.
        dtype: auto (bfloat16 on a CUDA device that supports it, else float32), float32, bfloat16 or float16.
        device: auto (CUDA if available, else CPU), cpu, cuda, cuda:N or mps.
    """
    check_sampling(max_new_tokens, temperature, top_p)
    lm, tokenizer = load_checked_model(model, dtype=dtype, device=device)
    torch.manual_seed(seed)
    messages: list[dict] = []
    print(f"chatting with {model}; {EXIT} or end of input quits", file=sys.stderr)
    for line in sys.stdin:
        text = line.strip()
        if text == EXIT:
            break
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        answer = complete(
            lm, tokenizer, conversation_ids(tokenizer, messages), max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p
        )
        messages.append({"role": "assistant", "content": answer})
        print(answer, flush=True)
