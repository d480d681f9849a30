"""Group-lasso pruning of a student's body (DESIGN §2, "Student architecture search").

A *group* is the incoming weights of one hidden unit: one row W_j of a hidden ``nn.Linear`` weight,
or one output channel W_c (C_in × k × k) of an ``nn.Conv2d``. The heads are never grouped: their
width is fixed by the expectations they predict. The penalty is

    R(φ) = Σ_layers Σ_units ‖W_unit‖₂          (biases are not penalised)

and the distillation loss becomes  mean ℓ + λ·R(φ).  ‖·‖₂ is not differentiable at 0; its
subgradient set there is the unit ball, and :func:`group_norms` returns the element 0 of it, so a unit
already at zero (e.g. a pruned one) gets no gradient and never a NaN.

After training with the penalty, a unit whose incoming weights are *all* below a threshold in
magnitude is pruned: a boolean *keep mask* per layer (True = kept), keyed by the layer's qualified
name in the student (``body.net.1``).  :func:`apply_masks` zeroes a pruned unit's incoming weights and
bias, so its activation is ReLU(0) = 0 and it contributes nothing downstream; calling it after every
optimizer step keeps pruned units at zero during fine-tuning.  A pruned student therefore keeps its
architecture (it loads like any other); :func:`compact` builds the equivalent smaller dense network,
and :func:`cost` counts parameters and multiply-adds with the pruned units left out.

Cost and compaction assume each prunable layer is fed by the previous one through element-wise
maps, pooling and flattening only (true of every body in :mod:`gped.core.models`): a Linear layer
after a flatten of C channels sees ``in_features / C`` inputs per channel.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..errors import GpedError

#: a unit is pruned when every one of its incoming weights is below this in magnitude (the paper's rule)
PRUNE_THRESHOLD = 1e-3

Masks = dict[str, torch.Tensor]


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The hidden Linear / Conv2d layers of ``model.body`` in forward order, by qualified name."""
    body = getattr(model, "body", None)
    if body is None:
        raise GpedError("group lasso and pruning need a student with a body (MultiHeadStudent)")
    return {f"body.{name}": m for name, m in body.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def group_norms(layer: nn.Module) -> torch.Tensor:
    """‖incoming weights‖₂ of every unit / output channel of ``layer`` (gradient 0 at a zero group)."""
    squares = layer.weight.flatten(1).pow(2).sum(1)
    positive = squares > 0
    # where() picks the branch per unit; the sqrt branch sees a clamped argument, so its gradient is
    # finite everywhere and the zero branch passes no gradient back: exact value, zero-safe gradient
    return torch.where(positive, squares.clamp_min(torch.finfo(squares.dtype).tiny).sqrt(), torch.zeros_like(squares))


def group_lasso_penalty(model: nn.Module) -> torch.Tensor:
    """R(φ) = Σ over hidden units and conv channels of the body of ‖incoming weights‖₂."""
    layers = prunable_layers(model)
    if not layers:
        return torch.zeros((), device=next(model.parameters()).device)
    return sum(group_norms(layer).sum() for layer in layers.values())


@torch.no_grad()
def prune_masks(model: nn.Module, threshold: float = PRUNE_THRESHOLD) -> Masks:
    """Keep masks: a unit is kept unless every incoming weight has magnitude < ``threshold``."""
    return {name: layer.weight.flatten(1).abs().amax(1) >= threshold for name, layer in prunable_layers(model).items()}


def check_masks(model: nn.Module, masks: Masks) -> Masks:
    """The masks as bool tensors on the model's device, checked against its layers (clear error if not)."""
    layers = prunable_layers(model)
    out: Masks = {}
    for name, mask in masks.items():
        if name not in layers:
            raise GpedError(f"pruning mask for {name!r}, which is not a hidden layer of this student ({', '.join(layers)})")
        mask = torch.as_tensor(mask).to(device=layers[name].weight.device, dtype=torch.bool)
        if mask.shape != (layers[name].weight.shape[0],):
            raise GpedError(f"pruning mask for {name!r} has shape {tuple(mask.shape)}, the layer has {layers[name].weight.shape[0]} units")
        out[name] = mask
    return out


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    """Zero the incoming weights and bias of every pruned unit (in place)."""
    layers = prunable_layers(model)
    for name, keep in masks.items():
        layer = layers[name]
        drop = ~keep
        layer.weight[drop] = 0.0
        if layer.bias is not None:
            layer.bias[drop] = 0.0


def units(model: nn.Module, masks: Masks | None = None) -> tuple[int, int]:
    """(units kept, units in all) over the hidden layers of the body."""
    layers = prunable_layers(model)
    total = sum(layer.weight.shape[0] for layer in layers.values())
    kept = sum(int(masks[n].sum()) if masks and n in masks else layer.weight.shape[0] for n, layer in layers.items())
    return kept, total


def _layer_geometry(model: nn.Module, input_shape) -> dict[nn.Module, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Input and output shape (without batch) of every Linear / Conv2d layer, from one dummy pass."""
    shapes: dict[nn.Module, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: shapes.__setitem__(mod, (tuple(inp[0].shape[1:]), tuple(out.shape[1:]))))
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    ]
    was_training = model.training
    param = next(model.parameters())
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), dtype=param.dtype, device=param.device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return shapes


def _active_inputs(in_units: int, prev: tuple[int, int] | None) -> int:
    """Inputs of a layer that come from kept units of the previous prunable layer."""
    if prev is None:
        return in_units
    kept, total = prev
    if in_units % total:
        raise GpedError(f"cannot relate a layer of {in_units} inputs to a previous layer of {total} units")
    return kept * (in_units // total)


def cost(model: nn.Module, input_shape, masks: Masks | None = None) -> dict[str, int]:
    """Parameters and multiply-adds per example of the Linear / Conv2d layers, pruned units left out.

    Linear (n_in → n_out): n_in·n_out multiply-adds; Conv2d (C_in → C_out, k_h×k_w, output H×W):
    C_in·C_out·k_h·k_w·H·W.  A pruned unit removes its own row / channel and its inputs to the next
    layer (a channel feeding a flatten removes H·W inputs).  Biases count as parameters, not as
    multiply-adds; activations and pooling are not counted.  Parameters of any other module (none in
    gped's networks) are counted as they are.
    """
    masks = masks or {}
    geometry = _layer_geometry(model, tuple(input_shape))
    layers = prunable_layers(model)
    counted: set[int] = set()
    params = macs = 0
    prev: tuple[int, int] | None = None

    def add(layer: nn.Module, n_in: int, n_out: int) -> None:
        nonlocal params, macs
        if layer not in geometry:
            raise GpedError("a layer of the student was not used in its forward pass; cannot count its cost")
        per_pair = layer.weight[0, 0].numel() if isinstance(layer, nn.Conv2d) else 1
        positions = math.prod(geometry[layer][1][1:]) if isinstance(layer, nn.Conv2d) else 1
        params += n_in * n_out * per_pair + (n_out if layer.bias is not None else 0)
        macs += n_in * n_out * per_pair * positions
        counted.update(id(p) for p in layer.parameters())

    for name, layer in layers.items():
        total = layer.weight.shape[0]
        kept = int(masks[name].sum()) if name in masks else total
        add(layer, _active_inputs(layer.weight.shape[1], prev), kept)
        prev = (kept, total)
    heads = getattr(model, "heads", {})
    for head in heads.values():
        add(head, _active_inputs(head.weight.shape[1], prev), head.weight.shape[0])
    params += sum(p.numel() for p in model.parameters() if id(p) not in counted)
    return {"params": params, "flops": macs}


@torch.no_grad()
def _slice(layer: nn.Module, keep_out: torch.Tensor | None, keep_in: torch.Tensor | None) -> nn.Module:
    """A copy of ``layer`` with only the kept output units and inputs (None: keep all)."""
    weight = layer.weight
    bias = layer.bias
    if keep_out is not None:
        weight = weight[keep_out]
        bias = bias[keep_out] if bias is not None else None
    if keep_in is not None:
        weight = weight[:, keep_in]
    if isinstance(layer, nn.Linear):
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    else:
        new = nn.Conv2d(weight.shape[1], weight.shape[0], layer.kernel_size, layer.stride, layer.padding, layer.dilation, bias=bias is not None)
    new = new.to(device=weight.device, dtype=weight.dtype)
    new.weight.copy_(weight)
    if bias is not None:
        new.bias.copy_(bias)
    return new


def _input_keep(n_in: int, prev_keep: torch.Tensor | None) -> torch.Tensor | None:
    if prev_keep is None:
        return None
    return prev_keep.repeat_interleave(n_in // len(prev_keep))


def compact(model: nn.Module, masks: Masks | None) -> nn.Module:
    """The equivalent dense network without the pruned units (a copy; the model is not changed).

    Exact because a pruned unit's incoming weights and bias are zero: its ReLU output is 0, so its
    outgoing weights never matter.  Used to time what a pruned student really costs to run.
    """
    compacted = copy.deepcopy(model)
    if not masks:
        return compacted
    masks = check_masks(model, masks)
    prev_keep: torch.Tensor | None = None
    replace: dict[str, nn.Module] = {}
    for name, layer in prunable_layers(compacted).items():
        keep = masks.get(name)
        replace[name] = _slice(layer, keep, _input_keep(layer.weight.shape[1], prev_keep))
        prev_keep = keep if keep is not None else torch.ones(layer.weight.shape[0], dtype=torch.bool, device=layer.weight.device)
    for name, head in list(compacted.heads.items()):
        replace[f"heads.{name}"] = _slice(head, None, _input_keep(head.weight.shape[1], prev_keep))
    for name, new in replace.items():
        parent_name, _, child = name.rpartition(".")
        setattr(compacted.get_submodule(parent_name), child, new)
    return compacted
