"""Closed-form compensation of what materialization removed (SVD-LLM's update of the kept
factor, FLAP's idea of repairing removed channels, as one least-squares step).

Block by block, on calibration windows that ran through the blocks already compensated, every
layer that lost something is refit on its output side so that, from the inputs the compressed
model now gives it, it reproduces what the dense layer computed from the dense model's inputs:
a factorized layer refits its output factor (its input factor stays), a layer whose input lost
channels or head groups refits its kept columns. Within a block the layers are refit in the
order they are called, each group that reads one input after the groups before it have been
refit, so every step sees the inputs it will see in use. The fit is ridge regression pulled
toward the layer's current weights, so a layer the windows say little about stays as it was.
Experts are left as they are: the router sends other tokens to an expert in the compressed model
than in the dense one, so there are no input pairs to fit on.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..layers import decoder_blocks, dense_weight, set_dense_weight
from ..modeling_hf_compress import ExpertLinears, FactorizedLinear
from ..offload import input_device, resident
from .whitening import block_output, record_block_calls

DAMPING = 1.0  # ridge toward the current weights, in units of the mean input energy (chosen on validation)


class _Reached(Exception):
    """Raised once the last layer of a group has seen its input: the rest of the block can wait."""


def _output_weight(layer: nn.Module) -> torch.Tensor:
    return layer.proj_out.weight if isinstance(layer, FactorizedLinear) else dense_weight(layer)


def _set_output_weight(layer: nn.Module, weight: torch.Tensor) -> None:
    if isinstance(layer, FactorizedLinear):
        layer.proj_out.weight.data = weight.to(layer.proj_out.weight).contiguous()
    else:
        set_dense_weight(layer, weight)


def _fit_input(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the refit weight multiplies: the input factor's output, or the input itself."""
    x = x.reshape(-1, x.shape[-1])
    return (layer.proj_in(x) if isinstance(layer, FactorizedLinear) else x).float()


@torch.no_grad()
def compensate(model: nn.Module, dense: nn.Module, windows: torch.Tensor, rows: dict[str, torch.Tensor | None],
               batch_size: int = 4, damping: float | None = None, show_progress: bool = True) -> nn.Module:
    """Refit, in place, the layers of `model` named in `rows` (each with the dense layer's output
    rows it kept, None for all) against `dense`, the model it was compressed from, on `windows`
    (n x seq_len token ids). Both models share embeddings and block arguments. `damping`: the
    ridge (default `DAMPING`)."""
    damping = DAMPING if damping is None else damping
    prefix, blocks = decoder_blocks(model)
    dense_blocks = decoder_blocks(dense)[1]
    batches = list(windows.to(input_device(model)).split(batch_size))
    hidden, calls = record_block_calls(model, blocks, batches)
    dense_hidden = list(hidden)  # the embeddings are not compressed
    for index in tqdm(range(len(blocks)), desc="compensation, block by block", leave=False, disable=not show_progress):
        block, dense_block, arguments = blocks[index], dense_blocks[index], calls[index]
        inside = {name.removeprefix(f"{prefix}.{index}."): kept for name, kept in rows.items()
                  if name.startswith(f"{prefix}.{index}.") and not _is_expert(model, name)}
        with resident(block, keep_changes=bool(inside)), resident(dense_block):  # offloaded blocks: one at a time
            dense_inputs = _run(dense_block, list(inside), dense_hidden, arguments)
            for group in _groups(block, list(inside), hidden[0], arguments[0]):
                _refit(block, dense_block, group, inside, dense_inputs, hidden, arguments, damping)
            _run(block, [], hidden, arguments)
        calls[index] = None
    return model


def _is_expert(model: nn.Module, name: str) -> bool:
    """Whether the layer `name` is one expert's matrix (`....experts.up.3`)."""
    return isinstance(model.get_submodule(name.rsplit(".", 2)[0]), ExpertLinears)


def _run(block: nn.Module, names: list[str], hidden: list[torch.Tensor], arguments) -> dict[str, list[torch.Tensor]]:
    """Run `block` on every batch (hidden states replaced by its outputs); return the inputs the
    named layers saw, per batch."""
    seen = {name: [] for name in names}
    handles = [block.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: seen[name].append(args[0])) for name in names]
    try:
        for b, (args, kwargs) in enumerate(arguments):
            hidden[b] = block_output(block(hidden[b], *args, **kwargs))
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _groups(block: nn.Module, names: list[str], hidden: torch.Tensor, call) -> list[list[str]]:
    """The named layers grouped by the input they read (q/k/v one, gate/up another), in call order."""
    order: list[tuple[str, torch.Tensor]] = []
    handles = [block.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: order.append((name, args[0]))) for name in names]
    try:
        block(hidden, *call[0], **call[1])
    finally:
        for handle in handles:
            handle.remove()
    groups: list[tuple[torch.Tensor, list[str]]] = []
    for name, x in order:
        group = next((members for tensor, members in groups if tensor is x), None)
        if group is None:
            groups.append((x, [name]))
        elif name not in group:
            group.append(name)
    return [members for _, members in groups]


def _refit(block, dense_block, group: list[str], rows: dict, dense_inputs: dict, hidden: list, arguments,
           damping: float) -> None:
    """Least squares for the output weights of one group of layers reading the same input."""
    gram: dict[str, torch.Tensor] = {}
    cross: dict[str, torch.Tensor] = {}
    batch = 0

    def accumulate(module, args, name):
        z = _fit_input(module, args[0])
        x = dense_inputs[name][batch].reshape(-1, dense_inputs[name][batch].shape[-1]).float()
        gram[name] = gram.get(name, 0) + z.t() @ z
        cross[name] = cross.get(name, 0) + x.t() @ z
        if name == group[-1]:
            raise _Reached

    handles = [block.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: accumulate(module, args, name)) for name in group]
    try:
        for batch, (args, kwargs) in enumerate(arguments):
            try:
                block(hidden[batch], *args, **kwargs)
            except _Reached:
                pass
    finally:
        for handle in handles:
            handle.remove()
    for name in group:
        layer = block.get_submodule(name)
        weight = dense_weight(dense_block.get_submodule(name)).float()
        if rows[name] is not None:
            weight = weight[rows[name].to(weight.device)]
        current = _output_weight(layer).float()
        g = gram[name]
        ridge = damping * g.diagonal().mean().clamp_min(1e-12)
        system = g + ridge * torch.eye(len(g), device=g.device)
        factor, info = torch.linalg.cholesky_ex(system)
        if info:  # not positive definite in float32: leave the layer as it is
            continue
        target = weight @ cross[name] + ridge * current  # out x r
        _set_output_weight(layer, torch.cholesky_solve(target.t(), factor).t())
