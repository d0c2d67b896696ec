"""``lightning-prune generate``: one completion of a prompt by a (pruned) model."""

import torch

from lightning_prune.commands.common import load_checked_model
from lightning_prune.errors import InputError

__all__ = ["generate", "check_sampling", "complete"]


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """Sampling options in range (before any weight loads)."""
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise InputError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p}")


def complete(model, tokenizer, input_ids: torch.Tensor, *, max_new_tokens: int, temperature: float, top_p: float) -> str:
    """The decoded new tokens after ``input_ids`` (1, T): greedy at temperature 0, else nucleus sampling."""
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    input_ids = input_ids.to(next(model.parameters()).device)
    with torch.no_grad():
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)


def generate(
    prompt: str,
    model: str = "demo",
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    dtype: str = "auto",
    device: str = "auto",
) -> None:
    """Print the model's completion of a prompt (greedy by default).

    Args:
        prompt: the text to continue.
        model: 'demo', a Hub id, a local model directory (a run's model/) or a .gguf file.
        max_new_tokens: tokens to generate at most.
        temperature: sampling temperature; 0 is greedy decoding.
        top_p: nucleus sampling: the smallest set of tokens with this probability mass (with temperature > 0).
        seed: seed of the sampling.
        dtype: auto (bfloat16 on a CUDA device that supports it, else float32), float32, bfloat16 or float16.
        device: auto (CUDA if available, else CPU), cpu, cuda, cuda:N or mps.
    """
    check_sampling(max_new_tokens, temperature, top_p)
    lm, tokenizer = load_checked_model(model, dtype=dtype, device=device)
    torch.manual_seed(seed)
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    print(complete(lm, tokenizer, input_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p))
