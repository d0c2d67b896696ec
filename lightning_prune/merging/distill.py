"""Functional core of merged-layer distillation (paper 004 Alg. 3/4, Eq. 6; spec (g)).

- :func:`hidden_kl`: KL(softmax(H_T) || softmax(H_S)) with the softmax over the hidden
  dimension D of each token's raw residual-stream vector, temperature 1, fp32, summed over D
  and averaged over tokens (spec (g): the paper's exact prefactor is unreadable; the mean
  over tokens keeps the loss scale independent of batch size and sequence length).
- :data:`DISTILLATION_LOSSES` / :func:`distillation_loss`: the losses a merged layer can be
  trained with, by short name. ``kl_raw`` is :func:`hidden_kl` (the paper's loss); the others
  see every hidden dimension even when one massive-activation dimension dominates the raw
  residual stream (SmolLM2: ~0.999 of the raw softmax mass sits on one dimension, so the raw
  KL barely reacts to the other 575).
- :func:`layer_outputs`: outputs of chosen decoder layers with the autograd graph kept,
  stopping the forward after the deepest one (no final norm, no LM head).
- :class:`BoundaryCache`: teacher boundary states for teacher-forced multi-process training,
  computed once per distinct batch, kept in memory up to a byte budget and spilled to disk
  (one ``torch.save`` file per batch) beyond it.
"""

import hashlib
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lightning_prune.capture import capture, layer_output
from lightning_prune.errors import InputError
from lightning_prune.model.anatomy import Anatomy

__all__ = [
    "DISTILLATION_LOSSES",
    "KL_LOSSES",
    "hidden_kl",
    "kl_raw",
    "kl_norm",
    "mse_norm",
    "cosine",
    "check_distillation_loss",
    "distillation_loss",
    "layer_outputs",
    "BoundaryCache",
]


def hidden_kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(softmax(teacher) || softmax(student)) over the last dimension.

    Args:
        teacher: target hidden states H_T^(a), shape (B, T, D) (no gradient needed).
        student: predicted hidden states H_S^(b), shape (B, T, D).

    Returns:
        Scalar fp32 loss, 0 exactly when the two distributions agree.
    """
    return kl_raw(teacher, student)


def _softmax_kl(target: torch.Tensor, prediction: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over tokens of KL(softmax(target/τ) || softmax(prediction/τ)) · τ², fp32."""
    log_target = F.log_softmax(target.detach().float() / temperature, dim=-1)
    log_prediction = F.log_softmax(prediction.float() / temperature, dim=-1)
    per_token = F.kl_div(log_prediction, log_target, log_target=True, reduction="none").sum(dim=-1)
    return per_token.mean() * temperature**2


def kl_raw(target: torch.Tensor, prediction: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Paper 004's loss (Alg. 3/4, Eq. 6; spec (g)): KL of softmaxes of the raw residual stream.

    The softmax runs over the hidden dimension D of each raw layer output. A massive-activation
    dimension (SmolLM2: one of 576 with values ~1000x the rest) takes almost all of the softmax
    mass, so this loss is nearly blind to the non-massive dimensions; it is kept for parity
    with the paper. ``temperature`` τ divides both states and the KL is scaled by τ² (Hinton
    et al.) so gradient sizes stay comparable across τ.

    Args:
        target: teacher hidden states H_T^(a), shape (B, T, D) (no gradient taken).
        prediction: student hidden states H_S^(b), shape (B, T, D).
        temperature: τ > 0.

    Returns:
        Scalar fp32 loss, 0 when the two distributions agree.
    """
    return _softmax_kl(target, prediction, temperature)


def kl_norm(target: torch.Tensor, prediction: torch.Tensor, *, norm: nn.Module, temperature: float = 1.0) -> torch.Tensor:
    """KL of softmaxes after the model's final norm (the space the LM head reads).

    ``norm`` (the final RMSNorm/LayerNorm, with its learned weight) is applied to both states
    first; its weight shrinks the massive dimension, so the softmax sees the other dimensions.

    Args:
        target: teacher hidden states, shape (B, T, D) (no gradient taken).
        prediction: student hidden states, shape (B, T, D).
        norm: the model's final norm module.
        temperature: τ > 0, as in :func:`kl_raw`.

    Returns:
        Scalar fp32 loss, 0 when the normalised states give the same distribution.
    """
    with torch.no_grad():
        normalised_target = norm(target.detach())
    return _softmax_kl(normalised_target, norm(prediction), temperature)


def _rms_normalise(hidden: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each token vector divided by its RMS over D (no learned weight), fp32."""
    hidden = hidden.float()
    return hidden * torch.rsqrt(hidden.pow(2).mean(dim=-1, keepdim=True) + eps)


def mse_norm(target: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """MSE between per-token RMS-normalised states, averaged over tokens and D.

    Each token vector is divided by its RMS, as a pre-norm block's RMSNorm does before its
    weight; the radial direction drops out of the gradient, so a massive dimension that holds
    most of a token's norm does not dominate the loss.

    Args:
        target: teacher hidden states, shape (B, T, D) (no gradient taken).
        prediction: student hidden states, shape (B, T, D).

    Returns:
        Scalar fp32 loss in [0, 4], 0 when the states are positive multiples of each other.
    """
    return F.mse_loss(_rms_normalise(prediction), _rms_normalise(target.detach()))


def cosine(target: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 1 − cos(target_t, prediction_t), fp32.

    Args:
        target: teacher hidden states, shape (B, T, D) (no gradient taken).
        prediction: student hidden states, shape (B, T, D).

    Returns:
        Scalar fp32 loss in [0, 2].
    """
    return (1 - F.cosine_similarity(prediction.float(), target.detach().float(), dim=-1, eps=1e-8)).mean()


DISTILLATION_LOSSES = {"kl_raw": kl_raw, "kl_norm": kl_norm, "mse_norm": mse_norm, "cosine": cosine}
KL_LOSSES = ("kl_raw", "kl_norm")


def check_distillation_loss(name: str, temperature: float | None = None) -> str:
    """``name`` if it is a known loss and ``temperature`` fits it, else :class:`InputError`."""
    if name not in DISTILLATION_LOSSES:
        raise InputError(f"distillation loss {name!r} is not known; choose one of {', '.join(DISTILLATION_LOSSES)}")
    if temperature is not None and name not in KL_LOSSES:
        raise InputError(f"temperature {temperature} applies to {' and '.join(KL_LOSSES)} only, not to loss {name!r}; leave it unset")
    if temperature is not None and not temperature > 0:
        raise InputError(f"temperature {temperature} must be > 0 (1 is the plain softmax)")
    return name


def distillation_loss(
    name: str, target: torch.Tensor, prediction: torch.Tensor, *, norm: nn.Module | None = None, temperature: float | None = None
) -> torch.Tensor:
    """The loss ``name`` of :data:`DISTILLATION_LOSSES` between teacher and student states.

    Args:
        name: ``kl_raw``, ``kl_norm``, ``mse_norm`` or ``cosine``.
        target: teacher hidden states, shape (B, T, D) (no gradient taken).
        prediction: student hidden states, shape (B, T, D).
        norm: the model's final norm; required by ``kl_norm``, ignored by the others.
        temperature: softmax temperature of the KL losses (default 1); refused for the others.

    Returns:
        Scalar fp32 loss.
    """
    check_distillation_loss(name, temperature)
    options = {} if temperature is None else {"temperature": temperature}
    if name == "kl_norm":
        if norm is None:
            raise InputError("loss 'kl_norm' needs the model's final norm; pass norm=Anatomy(model).final_norm or choose another loss")
        options["norm"] = norm
    return DISTILLATION_LOSSES[name](target, prediction, **options)


class _Stop(Exception):
    pass


def layer_outputs(model: nn.Module, input_ids: torch.Tensor, positions: Sequence[int]) -> dict[int, torch.Tensor]:
    """Outputs (B, T, D) of the decoder layers at ``positions``, graph kept; later layers are not run."""
    stack = Anatomy(model).layers
    wanted = sorted(set(positions))
    outputs: dict[int, torch.Tensor] = {}

    def hook(position):
        def record(module, args, output):
            outputs[position] = layer_output(output)
            if position == wanted[-1]:
                raise _Stop

        return record

    handles = [stack[p].register_forward_hook(hook(p)) for p in wanted]
    try:
        model(input_ids=input_ids, use_cache=False)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return outputs


class BoundaryCache:
    """Teacher inputs/targets per batch for teacher-forced training of merged layers.

    Args:
        teacher: the frozen original model.
        inputs: original-layer positions whose *input* is needed (first layer of each group).
        targets: original-layer positions whose *output* is needed (last layer of each group).
        memory_bytes: in-memory budget; further batches go to ``directory``.
        directory: spill directory (a temporary one is made when needed and none is given).
    """

    def __init__(
        self,
        teacher: nn.Module,
        inputs: Sequence[int],
        targets: Sequence[int],
        *,
        memory_bytes: int = 1 << 30,
        directory: str | None = None,
    ):
        self.teacher = teacher
        self.inputs, self.targets = sorted(set(inputs)), sorted(set(targets))
        self.memory_bytes = memory_bytes
        self.directory = Path(directory) if directory else None
        self.memory: dict[str, dict] = {}
        self.on_disk: set[str] = set()
        self.used_bytes = 0
        self.teacher_forwards = 0

    @staticmethod
    def key(input_ids: torch.Tensor) -> str:
        """Content hash of a batch of token ids (B, T)."""
        return hashlib.sha1(input_ids.detach().cpu().contiguous().numpy().tobytes()).hexdigest()

    @torch.no_grad()
    def _compute(self, input_ids: torch.Tensor) -> dict:
        self.teacher_forwards += 1
        device = next(self.teacher.parameters()).device
        with capture(self.teacher, sorted({*self.inputs, *self.targets})) as record:
            layer_outputs(self.teacher, input_ids.to(device), [max(self.targets)])
        return {
            "inputs": {p: record.inputs[p][0] for p in self.inputs},
            "targets": {p: record.outputs[p][0] for p in self.targets},
        }

    def _spill(self, key: str, entry: dict) -> None:
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="boundary-cache-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        torch.save({k: {p: t.cpu() for p, t in v.items()} for k, v in entry.items()}, self.directory / f"{key}.pt")
        self.on_disk.add(key)

    def get(self, input_ids: torch.Tensor) -> dict:
        """``{"inputs": {pos: (B,T,D)}, "targets": {pos: (B,T,D)}}`` for this batch, computing it once."""
        key = self.key(input_ids)
        if key in self.memory:
            return self.memory[key]
        device = next(self.teacher.parameters()).device
        if key in self.on_disk:
            entry = torch.load(self.directory / f"{key}.pt", map_location=device, weights_only=True)
            return entry
        entry = self._compute(input_ids)
        size = sum(t.numel() * t.element_size() for part in entry.values() for t in part.values())
        if self.used_bytes + size <= self.memory_bytes:
            self.memory[key] = entry
            self.used_bytes += size
        else:
            self._spill(key, entry)
        return entry
