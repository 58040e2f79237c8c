"""Rewriting a block with fewer units. A `Selection` labels a site's units: units with one
label become one unit whose rows are the members' mean (weighted by the squared norm of their
output columns) and whose columns are their sum, so a label held by one unit keeps that unit
unchanged and a cluster of identical units computes exactly what they computed together; label
-1 drops a unit.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..formats import mark_compressed
from ..errors import HfCompressError
from ..modeling_hf_compress import ExpertLinears, layer_like, replace_layer_, set_module_
from ..layers import decoder_blocks, dense_weight, find_targets, layer_shape, set_dense_weight, shrinkable_params
from ..offload import resident
from ..quantize import quantize, width_multiple
from .config import ShrinkConfig
from .selection import Selection
from .sites import EXPERT_WIDTHS, HEAD_COUNTS, MLP_WIDTHS, Segment, Site, head_layout, ing


def _read_rows(block, seg: Segment):
    module = block.get_submodule(seg.module)
    rows = slice(seg.start, seg.start + seg.units * seg.per_unit)
    weight = dense_weight(module)[rows].float().reshape(seg.units, -1)
    bias = None if module.bias is None else module.bias[rows].float().reshape(seg.units, -1)
    return weight, bias


def _read_columns(block, seg: Segment) -> torch.Tensor:
    weight = dense_weight(block.get_submodule(seg.module)).float()
    cols = weight[:, seg.start: seg.start + seg.units * seg.per_unit]
    return cols.reshape(len(weight), seg.units, seg.per_unit).transpose(0, 1).reshape(seg.units, -1)


def _rebuild(block: nn.Module, path: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Replace the layer at `path` by one of the same type holding `weight` (out x in) and `bias`."""
    def make(old, *_):
        new = layer_like(old, weight.shape[1], weight.shape[0])
        set_dense_weight(new, weight)
        if bias is not None:
            new.bias.data = bias.to(new.weight.dtype).contiguous()
        return new

    replace_layer_(block, path, make)


def output_weights(outputs: torch.Tensor) -> torch.Tensor:
    """How much a unit's input-side error costs: its output columns' squared norm. To first order,
    replacing a unit's input rows by a nearby center c moves the block's output by
    |output column| * |rows - c|, so a cluster's rows are merged by the mean weighted with this."""
    return outputs.pow(2).sum(1)


def weighted_means(x: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, k: int) -> torch.Tensor:
    """Per-cluster mean of the rows of `x`, each row counted with its weight (k x d)."""
    totals = torch.zeros(k, device=x.device).index_add_(0, labels, weights)
    sums = torch.zeros(k, x.shape[1], device=x.device).index_add_(0, labels, x * weights[:, None])
    return sums / totals.clamp_min(torch.finfo(totals.dtype).tiny)[:, None]


def kept_units(ratio: float, n: int, multiple: int = 1) -> int:
    """How many of `n` units a site shrunk to `ratio` keeps (at least one, a multiple of `multiple`)."""
    return min(n, max(multiple, round(ratio * n) // multiple * multiple))


def shrink_site(block: nn.Module, index: int, site: Site, ratio: float, selection: Selection, multiple: int = 1) -> int:
    """Rewrite one site of one block in place with the units `selection` keeps (row biases count
    as input side); returns the number of units kept, rounded down to a multiple of `multiple`."""
    n = site.reads[0].units
    k = kept_units(ratio, n, multiple)
    if k == n:
        return n
    reads = [_read_rows(block, seg) for seg in site.reads]
    writes = [_read_columns(block, seg) for seg in site.writes]
    inputs = torch.cat([w for w, _ in reads] + [b for _, b in reads if b is not None], dim=1)
    outputs = torch.cat(writes, dim=1)
    labels = selection.labels(index, site, inputs, outputs, k)
    kept = labels >= 0
    weights = output_weights(outputs[kept]).clamp_min(1e-12)  # a unit kept alone stays itself

    def mean(x):
        return weighted_means(x[kept], labels[kept], weights, k)

    def total(x):
        return torch.zeros(k, x.shape[1], device=x.device).index_add_(0, labels[kept], x[kept])

    pieces: dict[str, list] = {}
    for seg, (weight, bias) in zip(site.reads, reads):
        rows = mean(weight).reshape(k * seg.per_unit, -1)
        bias = None if bias is None else mean(bias).flatten()
        pieces.setdefault(seg.module, []).append((seg.start, rows, bias))
    for path, parts in pieces.items():
        module = block.get_submodule(path)
        parts.sort(key=lambda part: part[0])
        bias = None if module.bias is None else torch.cat([b for _, _, b in parts])
        _rebuild(block, path, torch.cat([w for _, w, _ in parts]), bias)
    for seg, columns in zip(site.writes, writes):
        module = block.get_submodule(seg.module)
        out_features = layer_shape(module).out_features
        weight = total(columns).reshape(k, out_features, seg.per_unit).transpose(0, 1).reshape(out_features, -1)
        _rebuild(block, seg.module, weight, None if module.bias is None else module.bias.data)
    return k


@torch.no_grad()
def rewrite(model: PreTrainedModel, config: ShrinkConfig, selection: Selection, found: list[tuple[int, float, Site]],
            dense_params: int, sizes: dict, show_progress: bool = True, **record) -> PreTrainedModel:
    """Shrink `model` in place with `selection` at the (block, ratio, site) entries `found`
    and return it (quantized, a new model, if `quantize` is set). Shrinking every block at one ratio keeps the architecture
    (smaller intermediate_size / head counts, no remote code needed); anything else records
    per-layer shapes for the self-contained checkpoint format. `dense_params` (`shrinkable_params`)
    and `sizes` (`source_sizes`) were measured before anything changed; `record` goes into the
    config beside what every shrink records."""
    text_config = model.config.get_text_config()
    _, blocks = decoder_blocks(model)
    uniform = _uniform(found, len(blocks))
    check_head_counts(blocks, config, uniform)
    kept = {"mlp": set(), "experts": set(), "attention": set()}
    multiple = width_multiple(config.quantize)
    for index, ratio, site in tqdm(found, desc=ing(config.verb), disable=not show_progress, leave=False):
        with resident(blocks[index], keep_changes=True):
            kept[site.kind].add(shrink_site(blocks[index], index, site, ratio, selection,
                                            1 if site.kind == "attention" else multiple))
    unfused = [name for name, module in model.named_modules() if isinstance(module, ExpertLinears)]
    if uniform:
        shrink_config(text_config, blocks, *(kept[kind].pop() if kept[kind] else None for kind in kept))
        for name in unfused:  # every expert at one width: transformers' stacks again
            set_module_(model, name, model.get_submodule(name).fused())
    elif unfused:
        record["experts"] = unfused  # the checkpoint rebuilds them
    shrunk = find_targets(model)  # expert Linears too, when they stay unfused
    params = shrinkable_params(model)
    shapes = {} if uniform else {name: [layer_shape(m).in_features, layer_shape(m).out_features]
                                 for name, m in shrunk.items()}
    mark_compressed(model, shapes=shapes, method=config.verb, **{config.verb: config.to_dict()}, **record,
                    size_ratio=round(params / dense_params, 6), target_params=params,
                    target_dense_params=dense_params, width_multiple=multiple, **sizes)
    return quantize(model, config.quantize, config.quantize_head) if config.quantize else model


def _uniform(found: list[tuple[int, float, Site]], n_blocks: int) -> bool:
    """Every block's MLP and attention, where shrunk, at one ratio: the architecture stays."""
    by_kind: dict[str, dict[int, float]] = {}
    for index, ratio, site in found:
        by_kind.setdefault(site.kind, {})[index] = ratio
    return all(len(r) == n_blocks and len(set(r.values())) == 1 for r in by_kind.values())


def check_head_counts(blocks: nn.ModuleList, config: ShrinkConfig, uniform: bool) -> None:
    """Blocks whose attention keeps its head counts (from the config) must all keep the same."""
    if config.heads_ratio < 1 and not uniform and any(hasattr(blocks[0].self_attn, n) for n in HEAD_COUNTS):
        raise HfCompressError(
            f"{type(blocks[0].self_attn).__name__} reads its head counts from the config, so a heads ratio below 1 "
            "needs --layers all"
        )


def shrink_config(config, blocks: nn.ModuleList, channels: int | None, expert_channels: int | None,
                  groups: int | None) -> None:
    """After a uniform shrink: the config (and head counts cached on attention modules)."""
    if channels is not None:
        setattr(config, next(name for name in MLP_WIDTHS if hasattr(config, name)), channels)
    if expert_channels is not None:
        setattr(config, next(name for name in EXPERT_WIDTHS if hasattr(config, name)), expert_channels)
    if groups is None:
        return
    heads, kv_heads, head_dim = head_layout(blocks[0], config)
    config.num_attention_heads = groups * heads // kv_heads
    config.num_key_value_heads = groups
    config.head_dim = head_dim
    for block in blocks:
        for name, value in zip(HEAD_COUNTS, (config.num_attention_heads, groups)):
            if hasattr(block.self_attn, name):
                setattr(block.self_attn, name, value)
