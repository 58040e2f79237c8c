"""Data-free folding: cluster structurally similar units of a block and merge each cluster.

A unit is an MLP channel (its rows in gate/up, its column in down) or a key/value head group
(a KV head with its query heads: rows in q/k/v, columns in o). Units are clustered with
k-means on their input-side rows, each weighted by the squared norm of its output-side
columns; a cluster becomes one unit whose rows are the members' weighted mean and whose
columns are their sum, so a cluster of identical units computes exactly what they computed
together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..checkpoint import mark_compressed, source_sizes
from ..errors import HfCompressError
from ..modeling_hf_compress import layer_like, replace_layer_
from ..models import decoder_blocks, dense_weight, find_targets, layer_shape, require_dense, set_dense_weight
from ..quantize import quantize, width_multiple
from .config import FoldConfig
from .kmeans import kmeans, weighted_means


@dataclass(frozen=True)
class Segment:
    """`units` consecutive units, each owning `per_unit` rows (or columns) from `start` on."""

    module: str  # path below the block
    start: int
    units: int
    per_unit: int


@dataclass(frozen=True)
class Site:
    reads: tuple[Segment, ...]  # units own output rows of these (merged by mean)
    writes: tuple[Segment, ...]  # units own input columns of these (merged by sum)


def _has(module, *names) -> bool:
    return module is not None and all(hasattr(module, n) for n in names)


def _exists(block, path) -> bool:
    try:
        block.get_submodule(path)
        return True
    except AttributeError:
        return False


def _out(block, path) -> int:
    return layer_shape(block.get_submodule(path)).out_features


def mlp_site(block: nn.Module) -> Site:
    mlp = getattr(block, "mlp", None)
    if _has(mlp, "gate_proj", "up_proj", "down_proj"):  # Llama, Qwen2, Mistral
        f = _out(block, "mlp.up_proj")
        return Site((Segment("mlp.gate_proj", 0, f, 1), Segment("mlp.up_proj", 0, f, 1)),
                    (Segment("mlp.down_proj", 0, f, 1),))
    if _has(mlp, "gate_up_proj", "down_proj"):  # Phi3: gate and up fused
        f = _out(block, "mlp.gate_up_proj") // 2
        return Site((Segment("mlp.gate_up_proj", 0, f, 1), Segment("mlp.gate_up_proj", f, f, 1)),
                    (Segment("mlp.down_proj", 0, f, 1),))
    for up, down in UNGATED_MLPS:
        if _exists(block, up) and _exists(block, down):
            f = _out(block, up)
            return Site((Segment(up, 0, f, 1),), (Segment(down, 0, f, 1),))
    if any(p.dim() > 2 for p in block.parameters()):
        raise HfCompressError(f"cannot fold the MLP of {type(block).__name__}: folding mixture-of-experts "
                              "layers (experts stored as 3-D tensors) is not supported yet")
    raise HfCompressError(
        f"cannot fold the MLP of {type(block).__name__}: expected gate_proj/up_proj/down_proj, "
        "gate_up_proj/down_proj, c_fc/c_proj, fc1/fc2 or dense_h_to_4h/dense_4h_to_h"
    )


UNGATED_MLPS = (("mlp.c_fc", "mlp.c_proj"),  # GPT-2
                ("fc1", "fc2"),  # OPT: in the block itself
                ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"))  # GPT-NeoX, Falcon
MLP_WIDTHS = ("intermediate_size", "ffn_dim", "ffn_hidden_size", "n_inner")  # config names of the MLP width


def head_layout(block: nn.Module, config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head size) of a block's attention."""
    heads = config.num_attention_heads
    return heads, getattr(config, "num_key_value_heads", None) or heads, block.self_attn.head_dim


def attention_site(block: nn.Module, config) -> Site:
    """Llama-style attention (the head size is its own config entry, so fewer heads keep it)."""
    attn = getattr(block, "self_attn", None)
    fused = _has(attn, "qkv_proj", "o_proj", "head_dim")  # Phi3: q, k, v fused in that order
    if not (fused or _has(attn, "q_proj", "k_proj", "v_proj", "o_proj", "head_dim")):
        raise HfCompressError(
            f"cannot fold attention heads of {type(block).__name__}: expected q/k/v/o or qkv/o projections "
            "with a head_dim of their own"
        )
    heads, kv_heads, head_dim = head_layout(block, config)
    spanning = [n for n in ("q_norm", "k_norm") if getattr(getattr(attn, n, None), "weight", torch.ones(0)).numel()
                not in (0, head_dim)]
    if spanning:
        raise HfCompressError(
            f"cannot fold attention heads of {type(block).__name__}: its {'/'.join(spanning)} normalize across all "
            "heads at once; fold its MLP only (heads ratio 1)"
        )
    group = heads // kv_heads * head_dim  # query rows of one KV group
    output = (Segment("self_attn.o_proj", 0, kv_heads, group),)
    if fused:
        q_rows, kv_rows = heads * head_dim, kv_heads * head_dim
        return Site((Segment("self_attn.qkv_proj", 0, kv_heads, group),
                     Segment("self_attn.qkv_proj", q_rows, kv_heads, head_dim),
                     Segment("self_attn.qkv_proj", q_rows + kv_rows, kv_heads, head_dim)), output)
    return Site((Segment("self_attn.q_proj", 0, kv_heads, group),
                 Segment("self_attn.k_proj", 0, kv_heads, head_dim),
                 Segment("self_attn.v_proj", 0, kv_heads, head_dim)), output)


# --- reading units out of weights and writing merged units back ---------------------------


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


def assign(inputs: torch.Tensor, outputs: torch.Tensor, k: int, config: FoldConfig) -> torch.Tensor:
    """Cluster label in [0, k) of each unit, or -1 for a unit that is dropped (magnitude)."""
    if config.method == "magnitude":
        labels = torch.full((len(inputs),), -1, dtype=torch.long, device=inputs.device)
        keep = torch.cat([inputs, outputs], dim=1).norm(dim=1).topk(k).indices.sort().values
        labels[keep] = torch.arange(k, device=inputs.device)
        return labels
    return kmeans(inputs, k, config.seed, config.iterations, weights=output_weights(outputs))


def output_weights(outputs: torch.Tensor) -> torch.Tensor:
    """How much a unit's input-side error costs: its output columns' squared norm. To first order,
    replacing a unit's input rows by a nearby center c moves the block's output by
    |output column| * |rows - c|, so a cluster's rows are merged by the mean weighted with this."""
    return outputs.pow(2).sum(1)


def variance_scale(inputs: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """sqrt(N / (1 + (N - 1) c)) per cluster, c = mean pairwise cosine of its members: a mean
    of N units has a smaller norm than its members unless they are parallel."""
    kept = labels >= 0
    z = torch.nn.functional.normalize(inputs[kept], dim=1)
    sums = torch.zeros(k, z.shape[1], device=z.device).index_add_(0, labels[kept], z)
    counts = torch.bincount(labels[kept], minlength=k).float()
    pairs = (counts * (counts - 1)).clamp_min(1)
    cosine = ((sums.pow(2).sum(1) - counts) / pairs).clamp(0, 1)
    return torch.where(counts > 1, (counts / (1 + (counts - 1) * cosine)).sqrt(), torch.ones_like(counts))


def fold_site(block: nn.Module, site: Site, ratio: float, config: FoldConfig, multiple: int = 1) -> int:
    """Fold one site of one block in place, as the module docstring says (row biases count as
    input side); returns the number of units kept, rounded down to a multiple of `multiple`."""
    n = site.reads[0].units
    k = min(n, max(multiple, round(ratio * n) // multiple * multiple))
    if k == n:
        return n
    reads = [_read_rows(block, seg) for seg in site.reads]
    writes = [_read_columns(block, seg) for seg in site.writes]
    inputs = torch.cat([w for w, _ in reads] + [b for _, b in reads if b is not None], dim=1)
    outputs = torch.cat(writes, dim=1)
    labels = assign(inputs, outputs, k, config)
    kept = labels >= 0
    weights = output_weights(outputs[kept])
    scale = variance_scale(inputs, labels, k)[:, None] if config.variance_correction else 1.0

    def mean(x):
        return weighted_means(x[kept], labels[kept], weights, k) * scale

    def total(x):
        return torch.zeros(k, x.shape[1], device=x.device).index_add_(0, labels[kept], x[kept])

    pieces: dict[str, list] = {}
    for seg, (weight, bias) in zip(site.reads, reads):
        rows = mean(weight).reshape(k * seg.per_unit, -1)
        pieces.setdefault(seg.module, []).append((seg.start, rows, None if bias is None else mean(bias).flatten()))
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
def fold(model: PreTrainedModel, config: FoldConfig | None = None, show_progress: bool = True,
         **overrides) -> PreTrainedModel:
    """Fold `model` in place and return it (quantized, a new model, if `quantize` is set).
    Folding every block at one ratio (layers="all") keeps the architecture (smaller
    intermediate_size / head counts, no remote code needed); any other schedule records
    per-layer shapes for the self-contained checkpoint format."""
    config = config or FoldConfig(**overrides)
    text_config = model.config.get_text_config()  # a composite model's language part
    _, blocks = decoder_blocks(model)
    plan = config.schedule(len(blocks))
    require_dense(model, "fold", "fold first, then compress")
    sizes = source_sizes(model)
    dense_params = sum(layer_shape(m).dense_params for m in find_targets(model).values())
    uniform = len(plan) == len(blocks) and len(set(plan.values())) == 1
    if config.heads_ratio < 1 and not uniform and _counts_heads(blocks[0]):
        raise HfCompressError(
            f"{type(blocks[0].self_attn).__name__} reads its head counts from the config, so its heads can "
            "only be folded with --layers all"
        )
    kept_channels, kept_groups = set(), set()
    for index, ratio in tqdm(plan.items(), desc="folding", disable=not show_progress, leave=False):
        block = blocks[index]
        kept_channels.add(fold_site(block, mlp_site(block), ratio, config, width_multiple(config.quantize)))
        if config.heads_ratio < 1:
            kept_groups.add(fold_site(block, attention_site(block, text_config), config.heads_ratio, config))
    if uniform:
        _shrink_config(text_config, blocks, kept_channels.pop(), kept_groups.pop() if kept_groups else None)
    folded = find_targets(model)
    params = sum(layer_shape(m).dense_params for m in folded.values())
    shapes = {} if uniform else {name: [layer_shape(m).in_features, layer_shape(m).out_features]
                                 for name, m in folded.items()}
    mark_compressed(model, shapes=shapes, method="fold", fold=config.to_dict(),
                    size_ratio=round(params / dense_params, 6), target_params=params,
                    target_dense_params=dense_params, width_multiple=width_multiple(config.quantize), **sizes)
    return quantize(model, config.quantize, config.quantize_head) if config.quantize else model


HEAD_COUNTS = ("num_heads", "num_key_value_heads")  # attention attributes some models keep


def _counts_heads(block: nn.Module) -> bool:
    return any(hasattr(getattr(block, "self_attn", None), name) for name in HEAD_COUNTS)


def _shrink_config(config, blocks: nn.ModuleList, channels: int, groups: int | None) -> None:
    """After a uniform fold: the config (and head counts cached on attention modules)."""
    setattr(config, next(name for name in MLP_WIDTHS if hasattr(config, name)), channels)
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
