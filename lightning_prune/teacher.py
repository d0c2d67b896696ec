"""Logit distillation from a frozen teacher (Minitron-style healing): chunked forward / reverse KL.

NVIDIA's Minitron heals a depth-pruned model by distilling the unpruned teacher's logits with
forward KL, which its authors found far better than the plain LM loss at the same token
budget. Here the loss is computed from the final hidden states (after the model's final norm,
what the LM head reads) in chunks of tokens: at no time do more than ``chunk_tokens`` x
vocabulary logits of the student and the teacher exist, in forward or backward (SmolLM2's
vocabulary is 49k, Llama-3's 128k).

``distillation_kl(student_hidden, teacher_hidden, student_head, teacher_head)`` is the one loss:

- ``forward_kl`` = KL(p_teacher || p_student) (mean over tokens), Minitron's choice;
- ``reverse_kl`` = KL(p_student || p_teacher);

both at temperature τ on the logits and multiplied by τ² (Hinton et al. 2015) so that the
gradient scale does not depend on τ. :func:`head_losses` computes it together with the
next-token cross-entropy (``alpha`` mixes them) from one pass of the student's LM head.

Two ways through the LM head, the same values and gradients:

- **fused** (a plain ``nn.Linear`` head, the default): one autograd function runs every chunk
  once. It computes the student's and the teacher's logits, the loss, and the loss's gradient
  with respect to the logits in closed form (forward KL: τ (p_s − p_t); reverse KL:
  τ p_s (log p_s − log p_t − KL); cross-entropy: softmax − one-hot), and from it the gradients
  of the hidden states and of the head's weight (only when the head trains). Backward only
  scales what was stored. Each chunk costs three vocabulary-sized matrix products (student
  logits, teacher logits, gradient).
- **checkpointed** (any other head, or ``fused=False``): each chunk goes through the heads
  inside ``torch.utils.checkpoint``, so backward recomputes the student's and the teacher's
  logits: about twice the LM-head work of the fused path.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_prune.errors import InputError

__all__ = ["KD_LOSSES", "TeacherDistillation", "distillation_kl", "causal_lm_loss", "head_losses", "final_hidden", "fusable"]

KD_LOSSES = ("forward_kl", "reverse_kl")
IGNORE = -100  # cross-entropy target of a position that predicts nothing (the last of each block)


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


def _rowwise_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b, -1) for (N, V) tensors without an (N, V) temporary."""
    return (a.unsqueeze(1) @ b.unsqueeze(2)).reshape(-1)


def _kl_rows_and_grad(
    logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, reverse: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KL (N,) at temperature tau (times tau^2) and ``scale`` x its gradient w.r.t. the student's logits (N, V).

    Overwrites both logits tensors (fresh from the heads; each (N, V) temporary costs an
    allocation that, on a CPU, is slower than the arithmetic on it).
    """
    if temperature != 1:
        logits, teacher_logits = logits.div_(temperature), teacher_logits.div_(temperature)
    log_p_student = F.log_softmax(logits, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits, dim=-1)
    del logits, teacher_logits
    if reverse:  # KL(s || t) = sum p_s (log p_s - log p_t); d/dz_s = p_s (log p_s - log p_t - KL)
        p_student = log_p_student.exp()
        difference = log_p_student.sub_(log_p_teacher)
        rows = _rowwise_dot(p_student, difference)
        grad = difference.sub_(rows[:, None]).mul_(p_student)
    else:  # KL(t || s) = sum p_t (log p_t - log p_s); d/dz_s = p_s - p_t
        p_teacher = log_p_teacher.exp()
        rows = _rowwise_dot(p_teacher, log_p_teacher.sub_(log_p_student))
        grad = log_p_student.exp_().sub_(p_teacher)
    # the loss is tau^2 KL(z / tau): its gradient w.r.t. the logits z is tau x the gradient w.r.t. z / tau
    return rows * temperature**2, grad.mul_(scale * temperature)


def _nll_rows_and_grad(logits: torch.Tensor, targets: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy (N,; 0 where the target is -100) and ``scale`` x its gradient (softmax - one-hot) w.r.t. the logits."""
    keep = targets != IGNORE
    safe = targets.clamp_min(0)[:, None]
    log_p = F.log_softmax(logits, dim=-1)
    rows = -log_p.gather(1, safe).squeeze(1) * keep
    grad = log_p.exp_()
    grad.scatter_add_(1, safe, -keep[:, None].to(grad.dtype))
    return rows, grad.mul_(keep[:, None].to(grad.dtype) * scale)


class _FusedHeadLosses(torch.autograd.Function):
    """(weighted total, per-loss sums) of chunked LM-head losses; gradients computed chunk by chunk in forward.

    ``chunk_loss(start, stop, logits)`` returns (per-loss sums (k,), d total / d logits (n, V)) for the
    rows ``start:stop``; backward scales the stored gradients of the hidden states, the weight and
    the bias by the incoming gradient of the total (a scalar).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, chunk_loss, chunk_tokens, total_weights):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_bias = bias is not None and ctx.needs_input_grad[2]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        sums = hidden.new_zeros(len(total_weights), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_tokens):
            states = hidden[start : start + chunk_tokens]
            logits = F.linear(states, weight, bias).float()
            parts, grad_logits = chunk_loss(start, start + states.shape[0], logits)
            sums += parts
            grad_logits = grad_logits.to(weight.dtype)
            if need_hidden:
                grad_hidden[start : start + states.shape[0]] = grad_logits @ weight
            if need_weight:
                grad_weight += (grad_logits.t() @ states.to(weight.dtype)).float()
            if need_bias:
                grad_bias += grad_logits.float().sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        total = (sums * sums.new_tensor(total_weights)).sum()
        ctx.mark_non_differentiable(sums)
        return total, sums

    @staticmethod
    def backward(ctx, grad_total, grad_sums):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scaled = [None if g is None else g * grad_total for g in (grad_hidden, grad_weight, grad_bias)]
        if scaled[1] is not None:
            scaled[1] = scaled[1].to(ctx.dtypes[0])
        if scaled[2] is not None:
            scaled[2] = scaled[2].to(ctx.dtypes[1])
        return scaled[0], scaled[1], scaled[2], None, None, None


def fusable(head: nn.Module) -> bool:
    """Whether the fused path can read the head's parameters: a plain ``nn.Linear`` with its full (out, in) weight."""
    return type(head) is nn.Linear and tuple(head.weight.shape) == (head.out_features, head.in_features)


def head_losses(
    student_hidden: torch.Tensor,
    student_head: nn.Module,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: nn.Module | None = None,
    input_ids: torch.Tensor | None = None,
    alpha: float = 1.0,
    temperature: float = 1.0,
    loss: str = "forward_kl",
    chunk_tokens: int = 1024,
    fused: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(alpha x KL + (1 - alpha) x cross-entropy, KL, cross-entropy) from one pass through the student's LM head.

    KL as :func:`distillation_kl` (mean over all B x T tokens, times tau^2; needs the teacher's
    hidden states and head unless ``alpha == 0``); cross-entropy as :func:`causal_lm_loss` (mean
    over B x (T - 1) predicted tokens; needs ``input_ids`` unless ``alpha == 1``). A loss with
    weight 0 is not computed and returned as 0.
    """
    if loss not in KD_LOSSES:
        raise InputError(f"distill loss {loss!r} is not known; choose one of {', '.join(KD_LOSSES)}")
    with_kd, with_lm = alpha > 0, alpha < 1
    batch, length, width = student_hidden.shape
    hidden = student_hidden.reshape(-1, width)
    teacher = teacher_hidden.reshape(-1, width).detach() if with_kd else None
    targets = None
    if with_lm:
        targets = torch.full((batch, length), IGNORE, dtype=torch.long, device=hidden.device)
        targets[:, :-1] = input_ids[:, 1:]
        targets = targets.reshape(-1)
    tokens, predicted = hidden.shape[0], batch * (length - 1)
    if not (fused and fusable(student_head)):
        kd = _checkpointed_kl(hidden, teacher, student_head, teacher_head, temperature, loss, chunk_tokens) if with_kd else None
        lm = _checkpointed_nll(hidden, targets, student_head, chunk_tokens) / predicted if with_lm else None
    else:
        weights = (alpha / tokens if with_kd else 0.0, (1 - alpha) / predicted if with_lm else 0.0)

        def chunk_loss(start: int, stop: int, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            parts, grad = logits.new_zeros(2), None
            if with_lm:  # first: the KL below overwrites the logits
                rows, grad = _nll_rows_and_grad(logits, targets[start:stop], weights[1])
                parts[1] = rows.sum()
            if with_kd:
                with torch.no_grad():
                    teacher_logits = teacher_head(teacher[start:stop]).float()
                rows, kd_grad = _kl_rows_and_grad(logits, teacher_logits, temperature, loss == "reverse_kl", weights[0])
                parts[0] = rows.sum()
                grad = kd_grad if grad is None else grad.add_(kd_grad)
            return parts, grad

        if torch.is_grad_enabled() and (hidden.requires_grad or student_head.weight.requires_grad):
            bias = student_head.bias
            total, sums = _FusedHeadLosses.apply(hidden, student_head.weight, bias, chunk_loss, chunk_tokens, weights)
            kd, lm = sums[0] / tokens, sums[1] / predicted
            return total, kd if with_kd else kd.new_zeros(()), lm if with_lm else lm.new_zeros(())
        with torch.no_grad():
            sums = hidden.new_zeros(2, dtype=torch.float32)
            for start in range(0, tokens, chunk_tokens):
                sums += chunk_loss(start, min(start + chunk_tokens, tokens), student_head(hidden[start : start + chunk_tokens]).float())[0]
        kd, lm = sums[0] / tokens, sums[1] / predicted
    zero = hidden.new_zeros((), dtype=torch.float32)
    kd = kd if with_kd else zero
    lm = lm if with_lm else zero
    return alpha * kd + (1 - alpha) * lm, kd, lm


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


def _checkpointed_kl(student, teacher, student_head, teacher_head, temperature, loss, chunk_tokens) -> torch.Tensor:
    """Mean per-token KL x tau^2, each chunk through the heads inside ``torch.utils.checkpoint``."""
    total = student.new_zeros((), dtype=torch.float32)
    for start in range(0, student.shape[0], chunk_tokens):
        chunk = slice(start, start + chunk_tokens)
        total = total + checkpoint(
            _chunk_kl, student[chunk], teacher[chunk], student_head, teacher_head, temperature, loss == "reverse_kl", use_reentrant=False
        )
    return total / student.shape[0] * temperature**2


def distillation_kl(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: nn.Module,
    teacher_head: nn.Module,
    *,
    temperature: float = 1.0,
    loss: str = "forward_kl",
    chunk_tokens: int = 1024,
    fused: bool = True,
) -> torch.Tensor:
    """Mean per-token KL between teacher and student next-token distributions, times tau^2.

    Args:
        student_hidden: (B, T, D) final hidden states of the student (with grad).
        teacher_hidden: (B, T, D) final hidden states of the teacher (no grad needed).
        student_head / teacher_head: the LM heads (B, T, D) -> (B, T, V); same vocabulary.
        temperature: tau > 0.
        loss: forward_kl or reverse_kl.
        chunk_tokens: tokens per LM-head chunk.
        fused: the fused path when the student's head allows it (see the module docstring); False: checkpointed.
    """
    return head_losses(
        student_hidden,
        student_head,
        teacher_hidden=teacher_hidden,
        teacher_head=teacher_head,
        temperature=temperature,
        loss=loss,
        chunk_tokens=chunk_tokens,
        fused=fused,
    )[0]


def _chunk_nll(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum", ignore_index=IGNORE)


def _checkpointed_nll(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, chunk_tokens: int) -> torch.Tensor:
    """Summed next-token cross-entropy, each chunk through the head inside ``torch.utils.checkpoint``."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        chunk = slice(start, start + chunk_tokens)
        total = total + checkpoint(_chunk_nll, hidden[chunk], targets[chunk], head, use_reentrant=False)
    return total


def causal_lm_loss(
    hidden: torch.Tensor, head: nn.Module, input_ids: torch.Tensor, *, chunk_tokens: int = 1024, fused: bool = True
) -> torch.Tensor:
    """Next-token cross-entropy from final hidden states (B, T, D), chunked like :func:`distillation_kl`.

    Equals the Hugging Face causal-LM loss: position t predicts token t + 1, mean over B x (T - 1).
    """
    return head_losses(hidden, head, input_ids=input_ids, alpha=0.0, chunk_tokens=chunk_tokens, fused=fused)[0]
