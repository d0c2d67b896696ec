"""Functional core of merged-layer distillation (paper 004 Alg. 3/4, Eq. 6; spec (g)).

- :func:`hidden_kl`: KL(softmax(H_T) || softmax(H_S)) with the softmax over the hidden
  dimension D of each token's raw residual-stream vector, temperature 1, fp32, summed over D
  and averaged over tokens (spec (g): the paper's exact prefactor is unreadable; the mean
  over tokens keeps the loss scale independent of batch size and sequence length).
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
from lightning_prune.model.anatomy import Anatomy

__all__ = ["hidden_kl", "layer_outputs", "BoundaryCache"]


def hidden_kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(softmax(teacher) || softmax(student)) over the last dimension.

    Args:
        teacher: target hidden states H_T^(a), shape (B, T, D) (no gradient needed).
        student: predicted hidden states H_S^(b), shape (B, T, D).

    Returns:
        Scalar fp32 loss, 0 exactly when the two distributions agree.
    """
    target = F.log_softmax(teacher.detach().float(), dim=-1)
    prediction = F.log_softmax(student.float(), dim=-1)
    per_token = F.kl_div(prediction, target, log_target=True, reduction="none").sum(dim=-1)
    return per_token.mean()


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
            entry = torch.load(self.directory / f"{key}.pt", map_location=device)
            return entry
        entry = self._compute(input_ids)
        size = sum(t.numel() * t.element_size() for part in entry.values() for t in part.values())
        if self.used_bytes + size <= self.memory_bytes:
            self.memory[key] = entry
            self.used_bytes += size
        else:
            self._spill(key, entry)
        return entry
