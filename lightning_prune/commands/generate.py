"""``lightning-prune generate``: one completion of a prompt by a (pruned) model."""

from dataclasses import dataclass

import torch

from lightning_prune.commands.common import load_checked_model
from lightning_prune.errors import InputError

__all__ = ["generate", "Sampling"]


@dataclass
class Sampling:
    """How a model continues text (shared by ``generate`` and ``chat``).

    Args:
        max_new_tokens: tokens to generate at most.
        temperature: sampling temperature; 0 is greedy decoding.
        top_p: nucleus sampling: the smallest set of tokens with this probability mass (with temperature > 0).
        seed: seed of the sampling.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def check(self) -> None:
        """Options in range (before any weight loads)."""
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")

    def complete(self, model, tokenizer, input_ids: torch.Tensor) -> str:
        """The decoded new tokens after ``input_ids`` (1, T): greedy at temperature 0, else nucleus sampling."""
        options = (
            {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p} if self.temperature > 0 else {"do_sample": False}
        )
        input_ids = input_ids.to(next(model.parameters()).device)
        with torch.no_grad():
            output = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=self.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                **options,
            )
        return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)

    def load(self, model: str, *, dtype: str, device: str):
        """Check the options, load ``(model, tokenizer)`` and seed the sampling."""
        self.check()
        loaded = load_checked_model(model, dtype=dtype, device=device)
        torch.manual_seed(self.seed)
        return loaded


def generate(prompt: str, sampling: Sampling, model: str = "demo", dtype: str = "auto", device: str = "auto") -> None:
    """Print the model's completion of a prompt (greedy by default).

    Args:
        prompt: the text to continue.
        sampling: max_new_tokens, temperature, top_p and seed (:class:`Sampling`).
        model: 'demo', a Hub id, a local model directory (a run's model/) or a .gguf file.
        dtype: auto (bfloat16 on a CUDA device that supports it, else float32), float32, bfloat16 or float16.
        device: auto (CUDA if available, else CPU), cpu, cuda, cuda:N or mps.
    """
    lm, tokenizer = sampling.load(model, dtype=dtype, device=device)
    print(sampling.complete(lm, tokenizer, tokenizer(prompt, return_tensors="pt").input_ids))
