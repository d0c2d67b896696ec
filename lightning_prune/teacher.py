"""Logit distillation from a frozen teacher (Minitron-style healing): chunked forward / reverse KL.

NVIDIA's Minitron heals a depth-pruned model by distilling the unpruned teacher's logits with
forward KL, which its authors found far better than the plain LM loss at the same token
budget. Here the loss is computed from the final hidden states (after the model's final norm,
what the LM head reads) in chunks of tokens, each chunk through the LM head inside
``torch.utils.checkpoint``: at no time do more than ``chunk_tokens`` x vocabulary logits of the
student and the teacher exist, in forward or backward (SmolLM2's vocabulary is 49k, Llama-3's
128k).

``distillation_kl(student_hidden, teacher_hidden, student_head, teacher_head)`` is the one loss:

- ``forward_kl`` = KL(p_teacher || p_student) (mean over tokens), Minitron's choice;
- ``reverse_kl`` = KL(p_student || p_teacher);

both at temperature τ on the logits and multiplied by τ² (Hinton et al. 2015) so that the
gradient scale does not depend on τ.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_prune.errors import InputError

__all__ = ["KD_LOSSES", "TeacherDistillation", "distillation_kl", "causal_lm_loss", "final_hidden"]

KD_LOSSES = ("forward_kl", "reverse_kl")


@dataclass
class TeacherDistillation:
    """Heal on the logits of a frozen teacher (mixed with the LM loss).

    Args:
        teacher: ``original`` (the dense model before the stages) or a model source with the same vocabulary.
        alpha: weight of the distillation loss; the LM loss gets ``1 - alpha`` (1: distillation only).
        temperature: softmax temperature tau on both logits (> 0); the KL is multiplied by tau^2.
        loss: forward_kl (Minitron) or reverse_kl.
        quantize: ``nf4`` keeps the teacher in 4-bit (bitsandbytes) to save memory; unset: full precision.
        chunk_tokens: tokens per LM-head chunk (bounds the logits held at once).
    """

    teacher: str = "original"
    alpha: float = 1.0
    temperature: float = 1.0
    loss: str = "forward_kl"
    quantize: str | None = None
    chunk_tokens: int = 1024

    def __post_init__(self):
        if self.loss not in KD_LOSSES:
            raise InputError(f"distill loss {self.loss!r} is not known; choose one of {', '.join(KD_LOSSES)}")
        if not self.temperature > 0:
            raise InputError(f"distill temperature {self.temperature} must be > 0 (1 = the plain softmax)")
        if not 0 <= self.alpha <= 1:
            raise InputError(f"distill alpha {self.alpha} must be in [0, 1] (1: distillation loss only)")
        if self.chunk_tokens < 1:
            raise InputError(f"distill chunk_tokens {self.chunk_tokens} must be >= 1")


def final_hidden(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The decoder's output after its final norm (what the LM head reads), shape (B, T, D)."""
    return model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state


def _chunk_kl(
    student: torch.Tensor, teacher: torch.Tensor, student_head: nn.Module, teacher_head: nn.Module, temperature: float, reverse: bool
) -> torch.Tensor:
    """Summed KL over the tokens of one chunk (student (N, D) with grad, teacher (N, D) without)."""
    log_p_student = F.log_softmax(student_head(student).float() / temperature, dim=-1)
    with torch.no_grad():
        log_p_teacher = F.log_softmax(teacher_head(teacher).float() / temperature, dim=-1)
    if reverse:
        return F.kl_div(log_p_teacher, log_p_student, log_target=True, reduction="sum")
    return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="sum")


def distillation_kl(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: nn.Module,
    teacher_head: nn.Module,
    *,
    temperature: float = 1.0,
    loss: str = "forward_kl",
    chunk_tokens: int = 1024,
) -> torch.Tensor:
    """Mean per-token KL between teacher and student next-token distributions, times tau^2.

    Args:
        student_hidden: (B, T, D) final hidden states of the student (with grad).
        teacher_hidden: (B, T, D) final hidden states of the teacher (no grad needed).
        student_head / teacher_head: the LM heads (B, T, D) -> (B, T, V); same vocabulary.
        temperature: tau > 0.
        loss: forward_kl or reverse_kl.
        chunk_tokens: tokens per checkpointed LM-head chunk.
    """
    student = student_hidden.reshape(-1, student_hidden.shape[-1])
    teacher = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
    total = student.new_zeros((), dtype=torch.float32)
    for start in range(0, student.shape[0], chunk_tokens):
        chunk = slice(start, start + chunk_tokens)
        total = total + checkpoint(
            _chunk_kl, student[chunk], teacher[chunk], student_head, teacher_head, temperature, loss == "reverse_kl", use_reentrant=False
        )
    return total / student.shape[0] * temperature**2


def _chunk_nll(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def causal_lm_loss(hidden: torch.Tensor, head: nn.Module, input_ids: torch.Tensor, *, chunk_tokens: int = 1024) -> torch.Tensor:
    """Next-token cross-entropy from final hidden states (B, T, D), chunked like :func:`distillation_kl`.

    Equals the Hugging Face causal-LM loss: position t predicts token t + 1, mean over B x (T - 1).
    """
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = input_ids[:, 1:].reshape(-1)
    total = states.new_zeros((), dtype=torch.float32)
    for start in range(0, states.shape[0], chunk_tokens):
        chunk = slice(start, start + chunk_tokens)
        total = total + checkpoint(_chunk_nll, states[chunk], targets[chunk], head, use_reentrant=False)
    return total / states.shape[0]
