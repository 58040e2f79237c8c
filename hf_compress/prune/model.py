"""Structured pruning: score every unit (`units.py`), keep the best of each site, drop the rest."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..errors import HfCompressError
from ..layers import decoder_blocks, dense_weight, require_dense
from ..allocate import PROBE_LENGTH, PROBE_WINDOWS, planned_sites, random_windows
from ..units import Magnitude, Site, TopK, shrink, sites
from .config import PruneConfig
from .torque import torque_scores


class Scored(TopK):
    """Keep the units a method scored highest: (block, site kind) -> one score per unit."""

    def __init__(self, table: dict[tuple[int, str], torch.Tensor]):
        self.table = table

    def scores(self, index, site, inputs, outputs):
        return self.table[index, site.kind]


@torch.no_grad()
def activation_scores(model: PreTrainedModel, data: torch.Tensor, found: list[tuple[int, float, Site]],
                      batch_size: int, show_progress: bool = True) -> dict[tuple[int, str], torch.Tensor]:
    """(block, site kind) -> each unit's score from one forward sweep over `data`, as Wanda-sp /
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

    hooks = [blocks[index].get_submodule(seg.module).register_forward_pre_hook(accumulate((index, seg.module)))
             for index, _, site in found for seg in site.writes]
    device = next(model.parameters()).device
    try:
        for batch in tqdm(data.split(batch_size), desc="activations", disable=not show_progress, leave=False):
            model(batch.to(device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    table = {}
    for index, _, site in found:
        total = 0
        for seg in site.writes:
            columns = slice(seg.start, seg.start + seg.units * seg.per_unit)
            weight = dense_weight(blocks[index].get_submodule(seg.module)).float()[:, columns]
            score = weight.abs().sum(0) * squares[index, seg.module][columns].sqrt()
            total = total + score.reshape(seg.units, seg.per_unit).sum(1)
        table[index, site.kind] = total
    return table


def prune(model: PreTrainedModel, data: torch.Tensor | None = None, config: PruneConfig | None = None,
          show_progress: bool = True, dataset: str | None = None, progress_dir: str | Path | None = None,
          **overrides) -> PreTrainedModel:
    """Prune `model` in place and return it (quantized, a new model, if `quantize` is set);
    `data` holds calibration windows (n, seq_len), needed by every method but "magnitude";
    `dataset` names where they came from, for the model card. "torque" trains the model first
    (resumable from `progress_dir`)."""
    config = config or PruneConfig(**overrides)
    if not config.needs_data:
        found = planned_sites(model, config, Magnitude(), random_windows(model), show_progress)
        return shrink(model, config, Magnitude(), found, show_progress)
    if data is None or len(data) == 0:
        raise HfCompressError(f"prune method '{config.method}' needs calibration windows")
    require_dense(model, config.verb, f"{config.verb} first, then compress")
    found = sites(model, config)
    about = {"windows": len(data), "seq_len": data.shape[1]} | ({"dataset": dataset} if dataset else {})
    sweep = partial(activation_scores, model, data, found, config.batch_size, show_progress)
    if config.method == "torque":  # a resumed torque run has ranked its units already
        table = torque_scores(model, data, found, config, sweep, progress_dir, show_progress)
        about["steps"] = config.max_steps
    else:
        table = sweep()
    chosen = Scored(table)
    found = planned_sites(model, config, chosen, data[:PROBE_WINDOWS, :PROBE_LENGTH], show_progress)
    return shrink(model, config, chosen, found, show_progress, **about)
