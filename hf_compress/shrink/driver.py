"""One driver for every same-architecture method, and the user's two verbs on top of it.

`shrink` finds the sites once (checking the model before anything changes), merges or drops
whole experts of mixture-of-experts layers, lets the method's selection look at the whole model, allocates the blocks' ratios under the "global" schedule, and
rewrites the blocks. `fold` and `prune` only pick the selection.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from ..errors import HfCompressError
from ..formats import source_sizes
from ..layers import decoder_blocks, require_dense, shrinkable_params
from ..modeling_hf_compress import unfuse_experts_
from .allocate import PROBE_LENGTH, PROBE_WINDOWS, allocated, random_windows
from .config import FoldConfig, PruneConfig, ShrinkConfig
from .experts import fewer_experts
from .kmeans import KMeansFold
from .rewrite import rewrite
from .selection import Activation, Magnitude, Selection
from .sites import fused_experts_of, sites
from .torque import Torque


def shrink(model: PreTrainedModel, config: ShrinkConfig, selection: Selection, data: torch.Tensor | None = None,
           show_progress: bool = True, **record) -> PreTrainedModel:
    """Shrink `model` in place with `selection` and return it (quantized, a new model, if
    `config.quantize` is set). A selection that needs data reads the calibration windows `data`
    (n, seq_len), and the "global" allocation probes the blocks with their start; the others
    probe with random token ids, so nothing but the weights is used. Shrinking every block at one
    ratio keeps the architecture (smaller intermediate_size / head counts, no remote code needed);
    anything else records per-layer shapes for the self-contained checkpoint format. `record`
    goes into the checkpoint's config."""
    require_dense(model, config.verb, f"{config.verb} first, then compress")
    if selection.needs_data and (data is None or len(data) == 0):
        raise HfCompressError(f"{config.verb} with {type(selection).__name__.lower()} scores needs calibration windows")
    found = sites(model, config)
    dense_params, sizes = shrinkable_params(model), source_sizes(model)
    if selection.needs_data:
        record |= {"windows": len(data), "seq_len": data.shape[1]}
    if config.experts_ratio < 1:
        record |= fewer_experts(model, config.experts_ratio, selection, data, config.verb, show_progress)
        found = sites(model, config)  # one site per expert left
    _, blocks = decoder_blocks(model)
    inside = {index for index, _, site in found if site.kind == "experts"}
    unfuse_experts_(blocks, [f"{index}.{fused_experts_of(blocks[index])[0]}" for index in inside])  # channels: Linears
    record |= selection.prepare(model, data, found, show_progress)
    probe = data[:PROBE_WINDOWS, :PROBE_LENGTH] if selection.needs_data else random_windows(model, seed=config.seed)
    found = allocated(model, config, selection, found, probe, show_progress)
    return rewrite(model, config, selection, found, dense_params, sizes, show_progress, **record)


def fold(model: PreTrainedModel, config: FoldConfig | None = None, show_progress: bool = True,
         **overrides) -> PreTrainedModel:
    """Fold `model` data-free in place: k-means merges similar MLP channels (and head groups)."""
    config = config or FoldConfig(**overrides)
    return shrink(model, config, KMeansFold(config), show_progress=show_progress)


def prune(model: PreTrainedModel, data: torch.Tensor | None = None, config: PruneConfig | None = None,
          show_progress: bool = True, dataset: str | None = None, progress_dir: str | Path | None = None,
          **overrides) -> PreTrainedModel:
    """Prune `model` in place with `config.method`; `data` holds calibration windows (n, seq_len),
    needed by every method but "magnitude"; `dataset` names where they came from, for the model
    card. "torque" trains the model first (resumable from `progress_dir`)."""
    config = config or PruneConfig(**overrides)
    if config.method == "torque":
        selection = Torque(config, progress_dir)
    else:
        selection = Activation(config) if config.method == "activation" else Magnitude()
    record = {"dataset": dataset} if dataset and selection.needs_data else {}
    return shrink(model, config, selection, data, show_progress, **record)
