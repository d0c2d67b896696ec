"""Record what flows through decoder layers, and replay a suffix of the stack from it.

- :func:`capture` is a context manager whose forward hooks record every chosen decoder
  layer's input hidden states and output (a tensor in transformers 5, a tuple in older
  versions) for each forward call; the hooks are removed on exit.
- :func:`capture_layer_inputs` runs batches only up to a layer and keeps what enters it:
  hidden states plus the keyword arguments the model passes to its layers (attention mask,
  rotary position embeddings, position ids), one set per attention type
  (``config.layer_types``), because masks differ between full and sliding layers.
- :func:`run_layers` / :func:`replay_logits` push such captured inputs through any sequence
  of the current layers (so a suffix can be re-run without recomputing the prefix).
"""

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_prune.model.anatomy import Anatomy

__all__ = [
    "Captured",
    "LayerInputs",
    "capture",
    "capture_layer_inputs",
    "to_device",
    "layer_output",
    "layer_type",
    "run_layers",
    "replay_logits",
]

DEFAULT_LAYER_TYPE = "full_attention"


def layer_output(output) -> torch.Tensor:
    """The hidden states a decoder layer returned (tensor, or first element of a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def layer_type(model: nn.Module, position: int) -> str:
    """Attention type of the layer at ``position`` (``config.layer_types``; full attention if absent)."""
    types = getattr(model.config, "layer_types", None)
    return types[position] if isinstance(types, list) else DEFAULT_LAYER_TYPE


def to_device(obj, device, *, detach: bool = True):
    """Tensors inside ``obj`` (nested tuples, lists, dicts) moved to ``device`` (detached unless ``detach`` is False)."""
    if isinstance(obj, torch.Tensor):
        return (obj.detach() if detach else obj).to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device, detach=detach) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device, detach=detach) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device, detach=detach) for k, v in obj.items()}
    return obj


def _split_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict]:
    """Separate the hidden states from the other layer arguments (positional or keyword)."""
    kwargs = dict(kwargs)
    hidden = args[0] if args else kwargs.pop("hidden_states")
    kwargs.pop("past_key_values", None)
    kwargs.pop("past_key_value", None)
    kwargs["use_cache"] = False
    return hidden, kwargs


@dataclass
class Captured:
    """Per layer position: the list of inputs/outputs recorded, one entry per forward call."""

    inputs: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    outputs: dict[int, list[torch.Tensor]] = field(default_factory=dict)


@contextmanager
def capture(
    model: nn.Module,
    layers: Iterable[int] | None = None,
    *,
    inputs: bool = True,
    outputs: bool = True,
    device: torch.device | str | None = None,
) -> Iterator[Captured]:
    """Record input and/or output hidden states of decoder layers while the block runs.

    Args:
        model: a supported causal LM.
        layers: positions to watch (default: all).
        inputs / outputs: what to record.
        device: where to keep recordings (default: where they were computed).

    Yields:
        :class:`Captured`, filled as forwards run; tensors are detached, shape (B, T, D).
    """
    stack = Anatomy(model).layers
    positions = range(len(stack)) if layers is None else list(layers)
    record = Captured()
    handles = []

    def pre_hook(position):
        def hook(module, args, kwargs):
            hidden, _ = _split_call(args, kwargs)
            record.inputs.setdefault(position, []).append(to_device(hidden, device or hidden.device))

        return hook

    def post_hook(position):
        def hook(module, args, kwargs, output):
            hidden = layer_output(output)
            record.outputs.setdefault(position, []).append(to_device(hidden, device or hidden.device))

        return hook

    try:
        for position in positions:
            if inputs:
                handles.append(stack[position].register_forward_pre_hook(pre_hook(position), with_kwargs=True))
            if outputs:
                handles.append(stack[position].register_forward_hook(post_hook(position), with_kwargs=True))
        yield record
    finally:
        for handle in handles:
            handle.remove()


class _StopForward(Exception):
    pass


@dataclass
class LayerInputs:
    """What enters decoder layer ``start`` for each batch, replayable through later layers.

    Attributes:
        start: position of the layer whose inputs were captured.
        hidden: per batch, the hidden states entering layer ``start``, shape (B, T, D).
        kwargs: per batch, the layer keyword arguments keyed by attention type.
    """

    start: int
    hidden: list[torch.Tensor]
    kwargs: list[dict[str, dict]]

    def __len__(self) -> int:
        return len(self.hidden)


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    start: int,
    *,
    device: torch.device | str | None = None,
) -> LayerInputs:
    """Run each batch of token ids (B, T) only as far as needed to capture layer ``start``'s inputs.

    The forward stops once layer ``start`` and one layer of every attention type have been
    entered, so the layers after them are never computed.
    """
    stack = Anatomy(model).layers
    types = [layer_type(model, i) for i in range(len(stack))]
    needed = {types[i]: i for i in reversed(range(len(stack)))}
    stop_at = max([start, *needed.values()])
    watch = sorted({start, *needed.values()})
    model_device = next(model.parameters()).device
    hidden_list, kwargs_list = [], []
    for batch in batches:
        seen: dict[str, dict] = {}

        def hook(module, args, kwargs, position):
            hidden, layer_kwargs = _split_call(args, kwargs)
            seen.setdefault(types[position], to_device(layer_kwargs, device or hidden.device))
            if position == start:
                hidden_list.append(to_device(hidden, device or hidden.device))
            if position == stop_at:
                raise _StopForward

        handles = [stack[p].register_forward_pre_hook(lambda m, a, k, p=p: hook(m, a, k, p), with_kwargs=True) for p in watch]
        try:
            model(input_ids=batch.to(model_device), use_cache=False)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        kwargs_list.append(seen)
    return LayerInputs(start=start, hidden=hidden_list, kwargs=kwargs_list)


def run_layers(
    model: nn.Module,
    hidden: torch.Tensor,
    kwargs_by_type: dict[str, dict],
    positions: Sequence[int],
) -> torch.Tensor:
    """Run ``hidden`` through the current layers at ``positions`` in order; return the output."""
    stack = Anatomy(model).layers
    for position in positions:
        kwargs = kwargs_by_type[layer_type(model, position)]
        kwargs = to_device(kwargs, hidden.device) if kwargs else kwargs
        hidden = layer_output(stack[position](hidden, **kwargs))
    return hidden


def replay_logits(model: nn.Module, inputs: LayerInputs, batch_index: int, skip: Iterable[int] = ()) -> torch.Tensor:
    """Logits (B, T, V) from captured inputs of one batch, through layers ``start..`` except ``skip``."""
    skip = set(skip)
    positions = [p for p in range(inputs.start, Anatomy(model).num_layers) if p not in skip]
    device = next(model.parameters()).device
    hidden = inputs.hidden[batch_index].to(device)
    hidden = run_layers(model, hidden, inputs.kwargs[batch_index], positions)
    return Anatomy(model).head(hidden)
