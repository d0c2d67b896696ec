"""The next-token loss's gradients, one decoder layer at a time (for onloaded models).

Autograd through a whole stack keeps every layer's weights alive for the backward, so an
onloaded model (:mod:`lightning_prune.onload`), whose layers go home after their forward,
cannot use ``torch.autograd.grad`` over the full graph. :func:`layer_gradients` computes the
same gradients by the chain rule, layer by layer: a no-grad forward stores what enters every
layer, the loss is differentiated with respect to the last hidden state, then each layer from
the top is brought in, re-run on its stored input and differentiated with the incoming
gradient, giving its parameters' gradients and the gradient passed to the layer below.
The result equals the whole-graph gradients up to floating-point summation order.
"""

from collections.abc import Callable, Sequence

import torch
from torch import nn

from lightning_prune.capture import capture_layer_inputs, layer_output, layer_type, run_layers
from lightning_prune.model.anatomy import Anatomy

__all__ = ["layer_gradients"]


def layer_gradients(
    model: nn.Module,
    batch: torch.Tensor,
    parameters_of: Callable[[int, nn.Module], Sequence[torch.Tensor]],
    receive: Callable[[int, list[torch.Tensor]], None],
) -> tuple[float, int]:
    """Differentiate the summed next-token cross-entropy of ``batch`` (B, T), one layer at a time.

    Args:
        model: the causal LM (its layers' parameters need not require grad).
        batch: token ids.
        parameters_of: for a layer position and module, the tensors whose gradients are wanted.
        receive: called top layer first with ``(position, gradients)``, gradients in the order of
            ``parameters_of`` (zeros for a tensor the layer does not use).

    Returns:
        ``(loss sum, number of predicted tokens)``.
    """
    anatomy = Anatomy(model)
    depth = anatomy.num_layers
    device = next(model.parameters()).device
    with torch.no_grad():
        start = capture_layer_inputs(model, [batch.to(device)], 0)
        kwargs = start.kwargs[0]
        hiddens = [start.hidden[0]]
        for position in range(depth):
            hiddens.append(run_layers(model, hiddens[-1], kwargs, [position]))
    with torch.enable_grad():
        last = hiddens[-1].detach().requires_grad_(True)
        logits = anatomy.head(last).float()
        targets = batch[:, 1:].to(logits.device)
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="sum")
        (incoming,) = torch.autograd.grad(loss, last)
        for position in reversed(range(depth)):
            layer = anatomy.layers[position]
            hidden = hiddens[position].detach().requires_grad_(True)
            layer_kwargs = kwargs[layer_type(model, position)]
            wanted = list(parameters_of(position, layer))
            flags = [t.requires_grad for t in wanted]
            for tensor in wanted:
                tensor.requires_grad_(True)
            try:
                output = layer_output(layer(hidden, **layer_kwargs))  # an onload hook brings the layer in
                grads = torch.autograd.grad(output, [hidden, *wanted], grad_outputs=incoming, allow_unused=True)
            finally:
                for tensor, flag in zip(wanted, flags):
                    tensor.requires_grad_(flag)
            incoming = grads[0]
            receive(position, [g if g is not None else torch.zeros_like(t) for g, t in zip(grads[1:], wanted)])
    return float(loss.detach()), targets.numel()
