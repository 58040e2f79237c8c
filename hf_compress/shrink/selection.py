"""How a method picks the units each site keeps: one small interface, one class per method.

`Selection.prepare` sees the whole model once, before any block changes (a method that scores
with data sweeps or trains there); `labels` then decides each site on its own (`rewrite.py`
says what a label means). k-means folding is `kmeans.KMeansFold`, exponential torque
`torque.Torque`; the pruning scores live here.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..errors import HfCompressError
from ..layers import decoder_blocks, dense_weight
from ..offload import input_device, resident
from .config import PruneConfig
from .sites import Site


class Selection:
    """Which units of a site survive and which merge. `needs_data`: `prepare` reads calibration
    windows, and the "global" allocation probes the blocks with them instead of random ids."""

    needs_data = False

    def prepare(self, model: PreTrainedModel, data: torch.Tensor | None, found: list[tuple[int, float, Site]],
                show_progress: bool = True) -> dict:
        """Look at the whole model before anything changes; returns what the checkpoint records."""
        return {}

    def labels(self, index: int, site: Site, inputs: torch.Tensor, outputs: torch.Tensor, k: int) -> torch.Tensor:
        """Label in [0, k) of each unit of block `index`'s `site`, or -1 to drop it. `inputs`
        holds each unit's input-side rows (and row biases) flattened, `outputs` its columns."""
        raise NotImplementedError

    def expert_groups(self, model: PreTrainedModel, layers: list, k: int, data: torch.Tensor | None,
                      show_progress: bool = True) -> list[list[torch.Tensor]]:
        """For each MoE layer (`experts.MoELayer`), the k groups of experts whose means become its
        new experts (a group of one keeps that expert as it is)."""
        raise HfCompressError(f"{type(self).__name__.lower()} selection cannot choose experts: fold, or prune with "
                              "--method activation, takes --experts-ratio")


class TopK(Selection):
    """Keep the k units that score highest, unchanged, and drop the rest: structured pruning."""

    def scores(self, index: int, site: Site, inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def labels(self, index, site, inputs, outputs, k):
        labels = torch.full((len(inputs),), -1, dtype=torch.long, device=inputs.device)
        keep = self.scores(index, site, inputs, outputs).topk(k).indices.sort().values
        labels[keep] = torch.arange(k, device=inputs.device)
        return labels


class Chosen(TopK):
    """Keep the given units (indices), unchanged."""

    def __init__(self, keep: torch.Tensor):
        self.keep = keep

    def scores(self, index, site, inputs, outputs):
        scores = torch.zeros(len(inputs), device=inputs.device)
        scores[self.keep.to(inputs.device)] = 1.0
        return scores


class Magnitude(TopK):
    """The data-free pruning baseline: a unit scores the norm of all its weights."""

    def scores(self, index, site, inputs, outputs):
        return torch.cat([inputs, outputs], dim=1).norm(dim=1)


class Scored(TopK):
    """Keep the units a method scored in `prepare`: (block, site) -> one score per unit."""

    needs_data = True

    def __init__(self, config: PruneConfig):
        self.config = config
        self.table: dict[tuple[int, Site], torch.Tensor] = {}

    def scores(self, index, site, inputs, outputs):
        return self.table[index, site]


class Activation(Scored):
    """Wanda-sp / FLAP: output weights times activation norms, from one forward sweep; experts by
    the router-weighted output they carry."""

    def prepare(self, model, data, found, show_progress=True):
        self.table = activation_scores(model, data, found, self.config.batch_size, show_progress) if found else {}
        return {}

    def expert_groups(self, model, layers, k, data, show_progress=True):
        scores = routed_outputs(model, layers, data, self.config.batch_size, show_progress)
        return [list(score.topk(k).indices.sort().values[:, None]) for score in scores]


@torch.no_grad()
def activation_scores(model: PreTrainedModel, data: torch.Tensor, found: list[tuple[int, float, Site]],
                      batch_size: int, show_progress: bool = True) -> dict[tuple[int, Site], torch.Tensor]:
    """(block, site) -> each unit's score from one forward sweep over `data`, as Wanda-sp /
    FLAP: the sum over its output-side columns j of |W[:, j]|_1 x ||x_j||, x_j that column's input
    over the calibration tokens, so a unit with large weights that is rarely active scores as low
    as an active unit with small weights."""
    _, blocks = decoder_blocks(model)
    squares: dict[tuple[int, str], torch.Tensor] = {}  # sum over tokens of each input column squared

    def accumulate(key):
        def hook(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            squares[key] = squares.get(key, 0) + x.pow(2).sum(0)
        return hook

    sweep(model, data, batch_size, "activations", show_progress,
          [blocks[index].get_submodule(seg.module).register_forward_pre_hook(accumulate((index, seg.module)))
           for index, _, site in found for seg in site.writes])
    table = {}
    for index, _, site in found:
        total = 0
        with resident(blocks[index]):
            for seg in site.writes:
                columns = slice(seg.start, seg.start + seg.units * seg.per_unit)
                weight = dense_weight(blocks[index].get_submodule(seg.module)).float()[:, columns]
                score = weight.abs().sum(0) * squares[index, seg.module][columns].sqrt()
                total = total + score.reshape(seg.units, seg.per_unit).sum(1)
        table[index, site] = total
    return table


@torch.no_grad()
def routed_outputs(model: PreTrainedModel, layers: list, data: torch.Tensor, batch_size: int,
                   show_progress: bool = True) -> list[torch.Tensor]:
    """Per MoE layer (`experts.MoELayer`), each expert's router-weighted output over `data`: the
    sum over the tokens routed to it of routing weight x the norm of what it returns."""
    scores = [torch.zeros(layer.count) for layer in layers]
    busy = []

    def observe(i):
        def hook(module, args, kwargs):
            if busy:  # the expert calls below
                return
            hidden, index, weights = (*args, *kwargs.values())[:3]
            busy.append(True)
            try:
                for expert in index.unique().tolist():
                    if expert >= layers[i].count:
                        continue
                    token, position = torch.where(index == expert)
                    single = torch.full((len(token), 1), expert, dtype=index.dtype, device=index.device)
                    out = module(hidden[token], single, torch.ones_like(weights[token][:, :1]))
                    scores[i][expert] += (weights[token, position].float() * out.float().norm(dim=-1)).sum().cpu()
            finally:
                busy.clear()
        return hook

    sweep(model, data, batch_size, "expert outputs", show_progress,
          [layer.experts.register_forward_pre_hook(observe(i), with_kwargs=True) for i, layer in enumerate(layers)])
    return scores


def sweep(model: PreTrainedModel, data: torch.Tensor, batch_size: int, desc: str, show_progress: bool,
          handles: list) -> None:
    """One forward over `data`, `batch_size` windows at a time, with the hooks `handles` in
    place; they are removed afterwards."""
    device = input_device(model)
    try:
        for batch in tqdm(data.split(batch_size), desc=desc, disable=not show_progress, leave=False):
            model(batch.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
