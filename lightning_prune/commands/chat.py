"""``lightning-prune chat``: a short interactive loop with a (pruned) model on stdin/stdout."""

import sys

import torch

from lightning_prune.commands.generate import Sampling

__all__ = ["chat", "conversation_ids"]

EXIT = "/exit"


def conversation_ids(tokenizer, messages: list[dict]) -> torch.Tensor:
    """(1, T) prompt ids: the tokenizer's chat template when it has one, else the turns' text concatenated."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        return ids["input_ids"]
    text = "".join(message["content"] + "\n" for message in messages)
    return tokenizer(text, return_tensors="pt").input_ids


def chat(sampling: Sampling, model: str = "demo", dtype: str = "auto", device: str = "auto") -> None:
    """Chat with a model: each stdin line is a user turn, answered on stdout; EOF or /exit ends.

    Args:
        sampling: max_new_tokens (per answer), temperature, top_p and seed (:class:`~lightning_prune.commands.generate.Sampling`).
        model: 'demo', a Hub id, a local model directory (a run's model/) or a .gguf file.
        dtype: auto (bfloat16 on a CUDA device that supports it, else float32), float32, bfloat16 or float16.
        device: auto (CUDA if available, else CPU), cpu, cuda, cuda:N or mps.
    """
    lm, tokenizer = sampling.load(model, dtype=dtype, device=device)
    messages: list[dict] = []
    print(f"chatting with {model}; {EXIT} or end of input quits", file=sys.stderr)
    for line in sys.stdin:
        text = line.strip()
        if text == EXIT:
            break
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        answer = sampling.complete(lm, tokenizer, conversation_ids(tokenizer, messages))
        messages.append({"role": "assistant", "content": answer})
        print(answer, flush=True)
