"""Units a decoder block can lose while it stays the same kind of block: MLP channels and
key/value head groups. Where their weights live, how a block is rewritten with fewer of them, and
the model-level driver that folding (`fold/`) and structured pruning (`prune/`) share.

A unit is an MLP channel (its rows in gate/up, its column in down) or a key/value head group
(a KV head with its query heads: rows in q/k/v, columns in o). A `Selection` decides, per site,
which units survive and which merge: units with one label become one unit whose rows are the
members' mean (weighted by the squared norm of their output columns) and whose columns are their
sum, so a label held by one unit keeps that unit unchanged and a cluster of identical units
computes exactly what they computed together; label -1 drops a unit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .formats import mark_compressed, source_sizes
from .errors import HfCompressError
from .modeling_hf_compress import layer_like, replace_layer_
from .layers import decoder_blocks, dense_weight, find_targets, layer_shape, set_dense_weight
from .quantize import check_method, quantize, width_multiple

SCHEDULES = ("global", "middle", "all")


@dataclass
class UnitConfig:
    """What `fold` and `prune` share. `ratio` is the fraction of MLP channels kept in each
    shrunk block, `heads_ratio` the fraction of key/value head groups kept (1.0 leaves attention
    alone). `layers` is the schedule: "middle" (every block but the first two and the last two),
    "all" (every block: the architecture stays, no remote code to load it), a list of block
    indices at `ratio`, or a {block: ratio} dict; "global" (`allocate.py`) makes `ratio` and
    `heads_ratio` whole-model fractions and lets each block keep what its measured cost deserves.
    `quantize` quantizes the result with bitsandbytes (widths rounded to what its kernel packs)."""

    ratio: float = 0.9
    heads_ratio: float = 1.0
    layers: str | list[int] | dict[int, float] = "middle"
    quantize: str | None = None  # nf4, fp4, int8
    quantize_head: bool = False

    verb = "shrink"  # what the operation is called in errors and records

    def __post_init__(self):
        ratios = {"ratio": self.ratio, "heads ratio": self.heads_ratio}
        if isinstance(self.layers, dict):
            ratios |= {f"ratio of block {index}": ratio for index, ratio in self.layers.items()}
        for name, value in ratios.items():
            if not 0 < value <= 1:
                raise HfCompressError(f"{name} must be in (0, 1], got {value}")
        if self.quantize is not None:
            check_method(self.quantize)
        if isinstance(self.layers, str) and self.layers not in SCHEDULES:
            raise HfCompressError(f"{self.verb} layers must be one of {SCHEDULES}, a list of blocks or a "
                                  f"{{block: ratio}} dict, not '{self.layers}'")

    def schedule(self, n_blocks: int) -> dict[int, float]:
        """The MLP ratio of each block to shrink (under "global", every block is a candidate)."""
        if self.layers in ("all", "global"):
            return dict.fromkeys(range(n_blocks), self.ratio)
        if self.layers == "middle":
            edge = min(2, (n_blocks - 1) // 4)  # tiny test models: every block
            return dict.fromkeys(range(edge, n_blocks - edge), self.ratio)
        plan = self.layers if isinstance(self.layers, dict) else dict.fromkeys(self.layers, self.ratio)
        plan = {int(index): ratio for index, ratio in plan.items()}
        if not plan or min(plan) < 0 or max(plan) >= n_blocks:
            raise HfCompressError(f"{self.verb} layers must be block indices in [0, {n_blocks}), got {sorted(plan)}")
        return dict(sorted(plan.items()))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Segment:
    """`units` consecutive units, each owning `per_unit` rows (or columns) from `start` on."""

    module: str  # path below the block
    start: int
    units: int
    per_unit: int


@dataclass(frozen=True)
class Site:
    kind: str  # "mlp" or "attention"
    reads: tuple[Segment, ...]  # units own output rows of these (merged by mean)
    writes: tuple[Segment, ...]  # units own input columns of these (merged by sum)


def _ing(verb: str) -> str:
    return verb.removesuffix("e") + "ing"


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


def mlp_site(block: nn.Module, verb: str = "fold") -> Site:
    mlp = getattr(block, "mlp", None)
    if _has(mlp, "gate_proj", "up_proj", "down_proj"):  # Llama, Qwen2, Mistral, Gemma
        f = _out(block, "mlp.up_proj")
        return Site("mlp", (Segment("mlp.gate_proj", 0, f, 1), Segment("mlp.up_proj", 0, f, 1)),
                    (Segment("mlp.down_proj", 0, f, 1),))
    if _has(mlp, "gate_up_proj", "down_proj"):  # Phi3: gate and up fused
        f = _out(block, "mlp.gate_up_proj") // 2
        return Site("mlp", (Segment("mlp.gate_up_proj", 0, f, 1), Segment("mlp.gate_up_proj", f, f, 1)),
                    (Segment("mlp.down_proj", 0, f, 1),))
    for up, down in UNGATED_MLPS:
        if _exists(block, up) and _exists(block, down):
            f = _out(block, up)
            return Site("mlp", (Segment(up, 0, f, 1),), (Segment(down, 0, f, 1),))
    if any(p.dim() > 2 for p in block.parameters()):
        raise HfCompressError(f"cannot {verb} the MLP of {type(block).__name__}: {_ing(verb)} mixture-of-experts "
                              "layers (experts stored as 3-D tensors) is not supported yet")
    raise HfCompressError(
        f"cannot {verb} the MLP of {type(block).__name__}: expected gate_proj/up_proj/down_proj, "
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


def attention_site(block: nn.Module, config, verb: str = "fold") -> Site:
    """Llama-style attention (the head size is its own config entry, so fewer heads keep it)."""
    attn = getattr(block, "self_attn", None)
    fused = _has(attn, "qkv_proj", "o_proj", "head_dim")  # Phi3: q, k, v fused in that order
    if not (fused or _has(attn, "q_proj", "k_proj", "v_proj", "o_proj", "head_dim")):
        raise HfCompressError(
            f"cannot {verb} attention heads of {type(block).__name__}: expected q/k/v/o or qkv/o projections "
            "with a head_dim of their own"
        )
    heads, kv_heads, head_dim = head_layout(block, config)
    spanning = [n for n in ("q_norm", "k_norm") if getattr(getattr(attn, n, None), "weight", torch.ones(0)).numel()
                not in (0, head_dim)]
    if spanning:
        raise HfCompressError(
            f"cannot {verb} attention heads of {type(block).__name__}: its {'/'.join(spanning)} normalize across all "
            "heads at once; shrink its MLP only (heads ratio 1)"
        )
    group = heads // kv_heads * head_dim  # query rows of one KV group
    output = (Segment("self_attn.o_proj", 0, kv_heads, group),)
    if fused:
        q_rows, kv_rows = heads * head_dim, kv_heads * head_dim
        return Site("attention", (Segment("self_attn.qkv_proj", 0, kv_heads, group),
                                  Segment("self_attn.qkv_proj", q_rows, kv_heads, head_dim),
                                  Segment("self_attn.qkv_proj", q_rows + kv_rows, kv_heads, head_dim)), output)
    return Site("attention", (Segment("self_attn.q_proj", 0, kv_heads, group),
                              Segment("self_attn.k_proj", 0, kv_heads, head_dim),
                              Segment("self_attn.v_proj", 0, kv_heads, head_dim)), output)


# --- choosing units, reading them out of weights and writing the survivors back -----------


class Selection:
    """Which units of a site survive and which merge (see the module docstring)."""

    def labels(self, index: int, site: Site, inputs: torch.Tensor, outputs: torch.Tensor, k: int) -> torch.Tensor:
        """Label in [0, k) of each unit of block `index`'s `site`, or -1 to drop it. `inputs`
        holds each unit's input-side rows (and row biases) flattened, `outputs` its columns."""
        raise NotImplementedError


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


def sites(model: PreTrainedModel, config: UnitConfig) -> list[tuple[int, float, Site]]:
    """(block, ratio, site) for every site `config` shrinks, in order; checks before anything changes."""
    text_config = model.config.get_text_config()  # a composite model's language part
    _, blocks = decoder_blocks(model)
    plan = config.schedule(len(blocks))
    found = []
    for index, ratio in plan.items():
        found.append((index, ratio, mlp_site(blocks[index], config.verb)))
        if config.heads_ratio < 1:
            found.append((index, config.heads_ratio, attention_site(blocks[index], text_config, config.verb)))
    return found


@torch.no_grad()
def shrink(model: PreTrainedModel, config: UnitConfig, selection: Selection, found: list[tuple[int, float, Site]],
           show_progress: bool = True, **record) -> PreTrainedModel:
    """Shrink `model` in place with `selection` at the (block, ratio, site) entries `found`
    (`allocate.planned_sites`, which also checks the model) and return it (quantized, a new
    model, if `quantize` is set). Shrinking every block at one ratio keeps the architecture
    (smaller intermediate_size / head counts, no remote code needed); anything else records
    per-layer shapes for the self-contained checkpoint format. `record` goes into the config
    beside what every shrink records."""
    text_config = model.config.get_text_config()
    _, blocks = decoder_blocks(model)
    sizes = source_sizes(model)
    dense_params = sum(layer_shape(m).dense_params for m in find_targets(model).values())
    uniform = _uniform(found, len(blocks))
    check_head_counts(blocks, config, uniform)
    kept = {"mlp": set(), "attention": set()}
    multiple = width_multiple(config.quantize)
    for index, ratio, site in tqdm(found, desc=_ing(config.verb), disable=not show_progress, leave=False):
        kept[site.kind].add(shrink_site(blocks[index], index, site, ratio, selection,
                                        multiple if site.kind == "mlp" else 1))
    if uniform:
        shrink_config(text_config, blocks, kept["mlp"].pop(), kept["attention"].pop() if kept["attention"] else None)
    shrunk = find_targets(model)
    params = sum(layer_shape(m).dense_params for m in shrunk.values())
    shapes = {} if uniform else {name: [layer_shape(m).in_features, layer_shape(m).out_features]
                                 for name, m in shrunk.items()}
    mark_compressed(model, shapes=shapes, method=config.verb, **{config.verb: config.to_dict()}, **record,
                    size_ratio=round(params / dense_params, 6), target_params=params,
                    target_dense_params=dense_params, width_multiple=multiple, **sizes)
    return quantize(model, config.quantize, config.quantize_head) if config.quantize else model


def _uniform(found: list[tuple[int, float, Site]], n_blocks: int) -> bool:
    """Every block's MLP (and attention, if any) shrunk at one ratio: the architecture stays."""
    by_kind: dict[str, dict[int, float]] = {}
    for index, ratio, site in found:
        by_kind.setdefault(site.kind, {})[index] = ratio
    return "mlp" in by_kind and all(len(r) == n_blocks and len(set(r.values())) == 1 for r in by_kind.values())


HEAD_COUNTS = ("num_heads", "num_key_value_heads")  # attention attributes some models keep


def check_head_counts(blocks: nn.ModuleList, config: UnitConfig, uniform: bool) -> None:
    """Blocks whose attention keeps its head counts (from the config) must all keep the same."""
    if config.heads_ratio < 1 and not uniform and any(hasattr(blocks[0].self_attn, n) for n in HEAD_COUNTS):
        raise HfCompressError(
            f"{type(blocks[0].self_attn).__name__} reads its head counts from the config, so a heads ratio below 1 "
            "needs --layers all"
        )


def shrink_config(config, blocks: nn.ModuleList, channels: int, groups: int | None) -> None:
    """After a uniform shrink: the config (and head counts cached on attention modules)."""
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
