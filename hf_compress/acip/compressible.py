"""The result of one ACIP pass: a model that can be materialized at any size in about a second.

On disk a compressible directory is the original model (config, tokenizer, `model.safetensors`)
plus `acip.safetensors` (per layer: U, s, Vt and scores, sorted so the values to keep first come
first and truncated where the layer would be dense anyway; LoRA factors; per site the order and
scores of its MLP channels or head groups; the calibration windows compensation runs on) and
`acip.json` (settings, layer shapes, sites, a summary of the pass).

One global order holds every ranked unit: singular values, MLP channels, key/value head groups.
A size keeps the longest prefix of it that fits (`Plan`: a rank per layer, a unit count per
site), so at each size whatever is cheapest goes, and a layer can lose channels and singular
values at once.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel

from ..cards import write_card
from ..evaluate import perplexity
from ..formats import META_FILE, OnDisk, StoredFactors, mark_compressed, model_class_for, save_factors
from ..errors import HfCompressError
from ..io import atomic_dir
from ..layers import (SHARD_BYTES, LayerShape, StoredTensor, decoder_blocks, dense_weight, files_bytes,
                      set_dense_weight, stored_tensors)
from ..loading import load_config, read_json, spread
from ..quantize import linear_tensors, quantize as quantize_model, width_multiple
from ..speed import call_overhead_params
from ..modeling_hf_compress import factorize_
from ..offload import input_device, resident
from ..shrink.rewrite import shrink_config, shrink_site
from ..shrink.selection import Chosen
from .compensate import compensate as compensate_layers
from .config import AcipConfig
from .gates import SiteRef, widths

FORMAT_VERSION = 1
FACTOR_KEYS = ("u", "s", "vt", "score")
WINDOWS_KEY = "calibration.windows"
STRUCTURES = ("mixed", "channels", "svd")  # what materialize may remove: anything; units only; values only


@dataclass
class LayerFactors:
    """One layer's singular triplets in keep order (best first), and its LoRA adapter."""

    shape: LayerShape
    u: torch.Tensor | OnDisk  # out x r (left on disk when loaded: materialize reads the kept columns)
    s: torch.Tensor  # r
    vt: torch.Tensor | OnDisk  # r x in
    score: torch.Tensor  # r, non-increasing
    lora_a: torch.Tensor | None = None  # q x in
    lora_b: torch.Tensor | None = None  # out x q (already scaled)

    @property
    def lora_rank(self) -> int:
        return 0 if self.lora_a is None else self.lora_a.shape[0]

    def params(self, rank: int, overhead: int = 0, shape: LayerShape | None = None) -> int:
        """Parameters when `rank` singular values are kept (at `shape` if units left the layer);
        LoRA is stacked into the factors."""
        return (shape or self.shape).params_at_rank(rank + self.lora_rank, overhead)

    def is_dense_at(self, rank: int, overhead: int = 0, shape: LayerShape | None = None) -> bool:
        return (shape or self.shape).is_dense_at(rank + self.lora_rank, overhead)

    def rounded(self, rank: int, multiple: int) -> int:
        """`rank` raised so that the stacked rank (with LoRA) is a multiple of `multiple`, within
        the stored values (all of them: the layer is stored dense)."""
        total = rank + self.lora_rank
        if multiple == 1 or total == 0:
            return rank
        return min(-(-total // multiple) * multiple - self.lora_rank, len(self.score))

    def tensors(self, name: str, rank: int, quantize: str | None, dtype: torch.dtype, overhead: int = 0,
                shape: LayerShape | None = None) -> list[StoredTensor]:
        """What the checkpoint stores of this layer (at `name`) at `rank`: dense, or two factor Linears."""
        shape, total = shape or self.shape, rank + self.lora_rank
        if shape.is_dense_at(total, overhead):
            stored = linear_tensors(name, shape.in_features, shape.out_features, quantize, dtype)
            bias = f"{name}.bias"
        else:
            stored = (linear_tensors(f"{name}.proj_in", shape.in_features, total, quantize, dtype)
                      + linear_tensors(f"{name}.proj_out", total, shape.out_features, quantize, dtype))
            bias = f"{name}.proj_out.bias"
        return stored + [StoredTensor(bias, dtype, (shape.out_features,))] * shape.bias

    def lora_delta(self) -> torch.Tensor | None:
        return None if self.lora_a is None else self.lora_b @ self.lora_a


@dataclass
class UnitScores:
    """One site's units (MLP channels or key/value head groups) in keep order, best first."""

    ref: SiteRef
    order: torch.Tensor  # unit indices
    score: torch.Tensor  # non-increasing


@dataclass
class Plan:
    """What one size keeps: the rank of each targeted layer and the number of units of each site
    (a site keeps its best units)."""

    ranks: dict[str, int]
    kept: dict[str, int]


def _restricted(matrix: torch.Tensor, rows=None, columns=None) -> torch.Tensor:
    """The given rows and columns of a matrix (all where None)."""
    matrix = matrix if rows is None else matrix[rows]
    return matrix if columns is None else matrix[:, columns]


class CompressibleModel:
    """A dense base model plus the score-ordered factors of every targeted layer and units of
    every site; `windows` are the calibration windows compensation runs on."""

    def __init__(self, base_model, layers: dict[str, LayerFactors], config: AcipConfig,
                 summary: dict | None = None, tokenizer=None, units: dict[str, UnitScores] | None = None,
                 windows: torch.Tensor | None = None):
        self.base_model = base_model
        self.layers = layers
        self.units = units or {}
        self.windows = windows
        self.config = config
        self.summary = summary or {}
        self.tokenizer = tokenizer
        self._orders = {}
        self._fixed_tensors = None  # weights outside the targeted layers, listed on first use

    @property
    def dense_params(self) -> int:
        return sum(f.shape.dense_params for f in self.layers.values())

    def _order(self, structure: str) -> torch.Tensor:
        """Owner of every ranked unit in global keep order (a layer's index for a singular value,
        len(layers) + a site's index for a channel or head group): higher score first, ties broken
        by larger singular value, then by owner and position (fully deterministic). A site's best
        unit always stays (a block keeps at least one channel and one head group)."""
        if structure not in STRUCTURES:
            raise HfCompressError(f"structure must be one of {STRUCTURES}, not '{structure}'")
        if structure not in self._orders:
            scores, values, owners = [], [], []
            if structure != "channels":
                for i, f in enumerate(self.layers.values()):
                    scores.append(f.score.double())
                    values.append(f.s.double())
                    owners.append(torch.full((len(f.score),), i))
            if structure != "svd":
                for j, u in enumerate(self.units.values(), start=len(self.layers)):
                    scores.append(torch.cat([torch.tensor([math.inf]), u.score[1:].double()]))
                    values.append(torch.zeros(len(u.score), dtype=torch.float64))
                    owners.append(torch.full((len(u.score),), j))
            scores, values, owners = (torch.cat(x) if x else torch.zeros(0) for x in (scores, values, owners))
            order = torch.sort(values, descending=True, stable=True).indices
            order = order[torch.sort(scores[order], descending=True, stable=True).indices]
            self._orders[structure] = owners[order].long()
        return self._orders[structure]

    def plan_at(self, size_ratio: float, multiple: int = 1, overhead: int = 0, structure: str = "mixed") -> Plan:
        """The largest prefix of the global order within `size_ratio` of the targeted parameters;
        with `multiple`, ranks and MLP widths are rounded up to multiples of it (and so counted);
        `overhead`: see `LayerShape.is_dense_at`; `structure`: what may be removed (STRUCTURES)."""
        if not 0 < size_ratio <= 1:
            raise HfCompressError(f"size ratio must be in (0, 1], got {size_ratio}")
        budget = size_ratio * self.dense_params
        return self._largest_prefix(lambda plan: self.params_of(plan, overhead) <= budget, multiple, structure,
                                    f"size ratio {size_ratio}")

    def plan_within(self, max_bytes: int, quantize: str | None = None, overhead: int = 0,
                    structure: str = "mixed", shard_bytes: int = SHARD_BYTES) -> Plan:
        """The largest model whose weight files (at most `shard_bytes` of tensors each) take at most `max_bytes`."""
        def fits(plan: Plan) -> bool:
            return self.checkpoint_bytes(plan, quantize, overhead, shard_bytes) <= max_bytes

        return self._largest_prefix(fits,
                                    width_multiple(quantize), structure, f"{max_bytes / 2**20:.1f} MiB")

    def _plan_for(self, k: int, structure: str, multiple: int) -> Plan:
        """What the first `k` entries of the global order keep."""
        counts = torch.bincount(self._order(structure)[:k], minlength=len(self.layers) + len(self.units)).tolist()
        ranks = {name: (len(f.score) if structure == "channels" else f.rounded(c, multiple))
                 for (name, f), c in zip(self.layers.items(), counts)}
        kept = {}
        for (name, u), c in zip(self.units.items(), counts[len(self.layers):]):
            n = u.ref.units
            step = multiple if u.ref.site.kind == "mlp" else 1
            kept[name] = n if structure == "svd" else min(n, -(-max(1, c) // step) * step)
        return Plan(ranks, kept)

    def _largest_prefix(self, fits, multiple: int, structure: str, budget: str) -> Plan:
        """Binary search for the longest prefix of the global order whose plan `fits` (cost grows
        with the prefix, so the search is exact)."""
        lo, hi = 0, len(self._order(structure))
        if not fits(self._plan_for(lo, structure, multiple)):
            kept = {"channels": "; with structure 'channels' every layer outside MLP channels and head groups "
                                "stays whole", "svd": "; with structure 'svd' every channel stays"}.get(structure, "")
            raise HfCompressError(f"{budget} is below the smallest model this pass can make "
                                  f"(what is not factorized, and LoRA adapters, cost more{kept})")
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(self._plan_for(mid, structure, multiple)) else (lo, mid - 1)
        return self._plan_for(lo, structure, multiple)

    def plan_of(self, ranks: dict[str, int]) -> Plan:
        """Explicit per-layer ranks, every unit kept."""
        return Plan(dict(ranks), {name: u.ref.units for name, u in self.units.items()})

    def shapes(self, plan: Plan) -> dict[str, LayerShape]:
        """Each targeted layer's shape once the plan's units are gone."""
        shapes = {name: f.shape for name, f in self.layers.items()}
        sizes = widths(shapes, [u.ref for u in self.units.values()], plan.kept)
        return {name: LayerShape(int(sizes[name][0]), int(sizes[name][1]), shape.bias)
                for name, shape in shapes.items()}

    def params_of(self, plan: Plan, overhead: int = 0) -> int:
        shapes = self.shapes(plan)
        return sum(self.layers[name].params(rank, overhead, shapes[name]) for name, rank in plan.ranks.items())

    def checkpoint_bytes(self, plan: Plan, quantize: str | None = None, overhead: int = 0,
                         shard_bytes: int = SHARD_BYTES) -> int:
        """Bytes of the safetensors files of the model this plan makes, quantized or not (the
        output head counted in float), headers included (at most: see `files_bytes`)."""
        if self._fixed_tensors is None:
            targeted = {f"{name}.{kind}" for name in self.layers for kind in ("weight", "bias")}
            self._fixed_tensors = [t for t in stored_tensors(self.base_model) if t.name not in targeted]
        dtype, shapes = self.base_model.dtype, self.shapes(plan)
        return files_bytes(self._fixed_tensors + [
            t for name, rank in plan.ranks.items()
            for t in self.layers[name].tensors(name, rank, quantize, dtype, overhead, shapes[name])], shard_bytes)

    def sizes(self, ratios, structure: str = "mixed") -> list[dict]:
        """What `materialize` makes at each size ratio: parameters, what is removed, bytes in
        float and quantized (what `info` prints)."""
        rows = []
        quantized = {method: (width_multiple(method), self.smallest_ratio(structure, width_multiple(method)))
                     for method in ("int8", "nf4")}
        for ratio in ratios:
            plan = self.plan_at(ratio, structure=structure)
            shapes = self.shapes(plan)
            factorized = sum(not f.is_dense_at(plan.ranks[name], 0, shapes[name]) for name, f in self.layers.items())
            row = {"size_ratio": ratio, "target_params": self.params_of(plan), **self.removed(plan),
                   "factorized_layers": factorized, "bytes": self.checkpoint_bytes(plan)}
            for method, (multiple, smallest) in quantized.items():  # None: below the kernel's rounded widths
                row[f"bytes_{method}"] = (self.checkpoint_bytes(self.plan_at(ratio, multiple, structure=structure), method)
                                          if ratio >= smallest else None)
            rows.append(row)
        return rows

    def smallest_ratio(self, structure: str = "mixed", multiple: int = 1) -> float:
        """The size ratio of the smallest model this pass makes (what is never removed, and the
        stacked LoRA of factorized layers, cost the rest), with widths rounded to `multiple`."""
        return self.params_of(self._plan_for(0, structure, multiple)) / self.dense_params

    def report(self, ratios=(0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)) -> dict:
        """What `info` prints: the pass's settings and summary, and `sizes` at each ratio it can make."""
        summary = {k: v for k, v in self.summary.items() if k != "history"}
        smallest = self.smallest_ratio()
        return {"config": self.config.to_dict(), "summary": summary, "target_dense_params": self.dense_params,
                "smallest_size_ratio": round(smallest, 4), "sizes": self.sizes(r for r in ratios if r >= smallest)}

    def removed(self, plan: Plan) -> dict:
        """The MLP channels and head groups a plan removes."""
        counts = {"mlp_channels": 0, "head_groups": 0}
        for name, u in self.units.items():
            counts["mlp_channels" if u.ref.site.kind == "mlp" else "head_groups"] += u.ref.units - plan.kept[name]
        return counts

    def uniform_ranks(self, size_ratio: float) -> dict[str, int]:
        """Every layer at `size_ratio` of its own size (the uniform-allocation baseline)."""
        ranks = {}
        for name, f in self.layers.items():
            budget, rank = size_ratio * f.shape.dense_params, len(f.score)
            while rank and f.params(rank) > budget:
                rank -= 1
            ranks[name] = rank
        return ranks

    def materialize(self, size_ratio: float | None = None, *, plan: Plan | dict[str, int] | None = None,
                    max_bytes: int | None = None, quantize: str | None = None,
                    quantize_head: bool = False, speed_aware: bool | int = False, structure: str = "mixed",
                    compensate: bool | None = None, shard_bytes: int = SHARD_BYTES) -> PreTrainedModel:
        """A transformers model at `size_ratio` of the targeted parameters, or the largest whose
        weights fit `max_bytes`: the units the global order ranks lowest are removed (with
        `structure` "channels" MLP channels and head groups only, "svd" singular values only),
        factorized layers become two small Linears, layers that end up dense are rebuilt at full
        rank, LoRA is merged. An explicit `plan` (or per-layer ranks: each layer's best values,
        every unit kept) overrides the global order. `compensate` refits what lost something on the
        stored calibration windows (acip/compensate.py); None: unless the pass trained LoRA, which
        repairs the same losses and which a refit toward the dense outputs would undo (measured:
        docs/BENCHMARKS.md). `quantize` (nf4, fp4, int8) returns it
        quantized with bitsandbytes, its ranks rounded to what the 4-bit kernel packs.

        `speed_aware=True` keeps a layer dense, within the same budget, where its two factors would
        not decode faster than the matrix on the device of this model (measured:
        `speed.call_overhead_params`); an int gives that overhead in weights instead. `shard_bytes`:
        the largest file it will be saved in (`max_bytes` counts one header per file)."""
        start = time.perf_counter()
        multiple = width_multiple(quantize)
        overhead = self.speed_overhead() if speed_aware is True else int(speed_aware)
        if isinstance(plan, dict):
            plan = self.plan_of(plan)
        if plan is None:
            if (size_ratio is None) == (max_bytes is None):
                raise HfCompressError("give exactly one of a size ratio and a byte budget")
            plan = (self.plan_at(size_ratio, multiple, overhead, structure) if max_bytes is None
                    else self.plan_within(max_bytes, quantize, overhead, structure, shard_bytes))
        model = self._build(plan, overhead, compensate, width_multiple=multiple)
        if quantize:
            model = quantize_model(model, quantize, quantize_head)
        model.materialize_seconds = time.perf_counter() - start
        return model

    def ratio_within_loss(self, windows: torch.Tensor, max_increase: float, quantize: str | None = None,
                          resolution: float = 0.01, report=None, **options) -> tuple[float, dict]:
        """The smallest size ratio (on a grid of `resolution`) whose mean loss on `windows`, held
        aside from calibration, stays within (1 + max_increase) x the dense model's: TAMADE's idea
        (arXiv 2505.17469). Binary search over materializations in memory (loss grows as the size
        shrinks); `report(ratio, loss, fits)` sees each try; `options` go to
        `materialize`. Returns the ratio and the search."""
        if not 0 < max_increase < 10:
            raise HfCompressError(f"the loss increase must be in (0, 10), got {max_increase}")
        dense = perplexity(self.base_model, windows)["loss"]
        limit = (1 + max_increase) * dense
        search = {"dense_loss": dense, "limit": limit, "max_increase": max_increase, "tries": []}

        def fits(step: int) -> bool:
            ratio = round(step * resolution, 6)
            try:
                loss = perplexity(self.materialize(ratio, quantize=quantize, **options), windows)["loss"]
            except HfCompressError:  # below the smallest model this pass can make
                loss = float("inf")
            search["tries"].append({"size_ratio": ratio, "loss": loss, "fits": loss <= limit})
            if report is not None:
                report(ratio, loss, loss <= limit)
            return loss <= limit

        lo, hi = 1, round(1 / resolution)
        if not fits(hi):
            raise HfCompressError(f"even size ratio 1.0{f' with {quantize}' if quantize else ''} loses more "
                                  f"than {max_increase:.1%} on these windows")
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
        return round(hi * resolution, 6), search

    def speed_overhead(self) -> int:
        """The time of one extra matmul call, in weights, where this model materializes."""
        return call_overhead_params(input_device(self.base_model), self.base_model.dtype)

    def _build(self, plan: Plan, overhead: int = 0, compensate: bool | None = None, **info) -> PreTrainedModel:
        """The model of `plan`, made block by block, so that the base and a whole dense copy are never
        in memory together: a base in memory has each block copied only when it is rewritten; a
        block Accelerate offloaded (a base loaded with a device map) is resident only meanwhile."""
        base_blocks = decoder_blocks(self.base_model)[1]
        in_memory = not getattr(self.base_model, "hf_device_map", None)
        model = copy.deepcopy(self.base_model, {id(block): nn.Identity() for block in base_blocks} if in_memory else {})
        shapes = self.shapes(plan)
        prefix, blocks = decoder_blocks(model)
        rows, columns, factorized = {}, {}, {}
        for index, base_block in enumerate(base_blocks):
            if in_memory:
                blocks[index] = copy.deepcopy(base_block)
            block, inside = blocks[index], f"{prefix}.{index}."
            with resident(block, keep_changes=True):
                kept_rows, kept_columns = self._remove_units(model, plan, inside)
                rows |= kept_rows
                columns |= kept_columns
                ranks = {name: rank for name, rank in plan.ranks.items() if name.startswith(inside)}
                factorized |= self._factorize(model, ranks, shapes, overhead, rows, columns)
        refit = {name: rows.get(name) for name in {*factorized, *columns}}
        if compensate is None:
            compensate = not any(f.lora_a is not None for f in self.layers.values())
        if compensate and refit and self.windows is not None:
            compensate_layers(model, self.base_model, self.windows, refit, show_progress=False)
            info["compensated_windows"] = len(self.windows)
        resized = {name: [s.in_features, s.out_features] for name, s in shapes.items() if s != self.layers[name].shape}
        earlier = (getattr(model.config, "hf_compress", None) or {}).get("shapes", {})  # a folded or pruned base
        if resized and not earlier and self._uniform(plan, model):
            resized = {}
        params = self.params_of(plan, overhead)
        if overhead:
            info["speed_overhead_params"] = overhead
        recorded = ("source_params", "source_bytes", "dataset", "seq_len", "windows")  # for the model card
        carried = {key: self.summary[key] for key in recorded if key in self.summary}
        mark_compressed(model, ranks=factorized, shapes={**earlier, **resized},
                        method="acip",
                        objective=self.config.objective, removed=self.removed(plan),
                        include=self.config.include, exclude=self.config.exclude,
                        source=self.summary.get("source"), size_ratio=round(params / self.dense_params, 6),
                        target_params=params, target_dense_params=self.dense_params, **carried, **info)
        return model.eval()

    def _factorize(self, model, ranks: dict[str, int], shapes: dict, overhead: int, rows: dict,
                   columns: dict) -> dict[str, int]:
        """Layers at `ranks` in `model`: dense ones get their LoRA merged, the others become two
        factors holding the kept singular vectors (restricted to the kept rows and columns);
        returns the stacked rank of each factorized one."""
        factorized = {}
        for name, rank in ranks.items():
            f = self.layers[name]
            module = model.get_submodule(name)
            if f.is_dense_at(rank, overhead, shapes[name]):
                delta = f.lora_delta()
                if delta is not None:
                    delta = _restricted(delta, rows.get(name), columns.get(name)).to(module.weight.device)
                    set_dense_weight(module, dense_weight(module).float() + delta.float())
            else:
                factorized[name] = rank + f.lora_rank
        biases = {name: model.get_submodule(name).bias for name in factorized}
        factorize_(model, factorized)
        for name in factorized:
            self._fill(model.get_submodule(name), self.layers[name], ranks[name], biases[name], rows.get(name),
                       columns.get(name))
        return factorized

    def _remove_units(self, model, plan: Plan, inside: str = "") -> tuple[dict, dict]:
        """Take the units the plan drops (of the sites whose names start with `inside`) out of the
        dense copy `model` (structured pruning: the same code as `prune`); return, per layer that
        lost some, the original rows and columns it keeps (what its factors are restricted to)."""
        rows, columns = {}, {}
        for name, u in self.units.items():
            n, k = u.ref.units, plan.kept[name]
            if k == n or not u.ref.prefix.startswith(inside):
                continue
            keep = u.order[:k].sort().values
            shrink_site(model.get_submodule(u.ref.prefix.rstrip(".")), 0, u.ref.site, k / n, Chosen(keep))
            for layer, seg, side in u.ref.segments():
                kept = rows if side == "out" else columns
                size = self.layers[layer].shape.out_features if side == "out" else self.layers[layer].shape.in_features
                mask = kept.get(layer, torch.ones(size, dtype=torch.bool))
                dropped = torch.ones(n, dtype=torch.bool)
                dropped[keep] = False
                units = seg.start + torch.arange(n)[dropped, None] * seg.per_unit + torch.arange(seg.per_unit)
                mask[units.flatten()] = False
                kept[layer] = mask
        return ({name: m.nonzero().squeeze(1) for name, m in rows.items()},
                {name: m.nonzero().squeeze(1) for name, m in columns.items()})

    def _uniform(self, plan: Plan, model) -> bool:
        """Whether every block keeps the same number of channels (and of head groups); if so the
        config of `model` is rewritten to say the new widths, and the architecture stays the
        vanilla one (else the checkpoint records per-layer shapes)."""
        _, blocks = decoder_blocks(model)
        kept = {}
        for name, u in self.units.items():
            kept.setdefault(u.ref.site.kind, []).append((plan.kept[name], u.ref.units))
        removed = {kind: [k for k, _ in pairs] for kind, pairs in kept.items() if any(k < n for k, n in pairs)}
        if not all(len(counts) == len(blocks) and len(set(counts)) == 1 for counts in removed.values()):
            return False
        shrink_config(model.config.get_text_config(), blocks, removed["mlp"][0] if "mlp" in removed else None, None,
                      removed["attention"][0] if "attention" in removed else None)
        return True

    def to(self, device=None, dtype: torch.dtype | None = None) -> CompressibleModel:
        """Materialize on `device` in `dtype` from now on (the stored factors stay fp32 on CPU)."""
        self.base_model.to(device=device, dtype=dtype)
        self._fixed_tensors = None
        return self

    @staticmethod
    def _fill(module, f: LayerFactors, rank: int, bias, rows=None, columns=None) -> None:
        proj_in = _restricted(f.s[:rank, None] * f.vt[:rank].float(), None, columns)
        proj_out = _restricted(f.u[:, :rank].float(), rows, None)
        if f.lora_a is not None:
            proj_in = torch.cat([proj_in, _restricted(f.lora_a.float(), None, columns)])
            proj_out = torch.cat([proj_out, _restricted(f.lora_b.float(), rows, None)], dim=1)
        module.proj_in.weight.data = proj_in.to(module.proj_in.weight).contiguous()
        module.proj_out.weight.data = proj_out.to(module.proj_out.weight).contiguous()
        if bias is not None:
            module.proj_out.bias.data = bias.data.clone()

    # --- persistence ---------------------------------------------------------------------

    def save_pretrained(self, output: str | Path, overwrite: bool = False, max_shard_size: int | str = SHARD_BYTES) -> Path:
        """The dense base as transformers saves it, the factors beside it (both in files of at most
        `max_shard_size`), the settings and summary, and a card."""
        tensors = {}
        for name, f in self.layers.items():
            for key in FACTOR_KEYS:
                value = getattr(f, key)
                tensors[f"{name}.{key}"] = (value[...] if isinstance(value, OnDisk) else value).contiguous()
            if f.lora_a is not None:
                tensors[f"{name}.lora_a"] = f.lora_a.contiguous()
                tensors[f"{name}.lora_b"] = f.lora_b.contiguous()
        for name, u in self.units.items():
            tensors[f"units.{name}.order"] = u.order.contiguous()
            tensors[f"units.{name}.score"] = u.score.contiguous()
        if self.windows is not None:
            tensors[WINDOWS_KEY] = self.windows.contiguous()
        meta = {
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "layers": {name: f.shape.to_json() for name, f in self.layers.items()},
            "units": {name: u.ref.to_json() for name, u in self.units.items()},
            "summary": self.summary,
        }
        with atomic_dir(output, overwrite=overwrite) as tmp:
            self.base_model.save_pretrained(tmp, max_shard_size=max_shard_size)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            save_factors(tensors, tmp, max_shard_size)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
            write_card(tmp, Path(output).name)
        return Path(output)

    @classmethod
    def from_pretrained(cls, path: str | Path, trust_remote_code: bool = False, dtype: torch.dtype | str = "auto",
                        device_map: str | dict | None = None, max_memory: dict | None = None) -> CompressibleModel:
        """Load a compressible directory; `trust_remote_code` when its model runs its own code. The
        singular vectors stay on disk until a size reads the ones it keeps; with `device_map` and
        `max_memory` the dense base too stays on disk past the limit (Accelerate's big-model
        loading), and materialization rewrites it one block at a time."""
        path = Path(path)
        if not (path / META_FILE).is_file():
            raise HfCompressError(
                f"{path} is not a compressible directory (no {META_FILE}); create one with "
                "`hf-compress compress`"
            )
        meta = read_json(path / META_FILE, "compressible metadata")
        if meta.get("format_version") != FORMAT_VERSION:
            raise HfCompressError(f"{path}: unsupported format version {meta.get('format_version')}")
        try:
            stored = StoredFactors(path)
            layers = {}
            for name, shape in meta["layers"].items():
                vectors = {k: stored.on_disk(f"{name}.{k}") for k in ("u", "vt")}
                values = {k: stored.load(f"{name}.{k}") for k in ("s", "score")}
                lora = {k: stored.load(key) for k in ("lora_a", "lora_b") if (key := f"{name}.{k}") in stored}
                layers[name] = LayerFactors(LayerShape.from_json(shape), **vectors, **values, **lora)
            units = {name: UnitScores(SiteRef.from_json(ref), stored.load(f"units.{name}.order"),
                                      stored.load(f"units.{name}.score")) for name, ref in meta.get("units", {}).items()}
            windows = stored.load(WINDOWS_KEY) if WINDOWS_KEY in stored else None
            config = load_config(path, trust_remote_code)
            placement = spread(device_map, max_memory) if device_map else {}
            base = model_class_for(config, trust_remote_code).from_pretrained(  # folded bases too
                path, trust_remote_code=trust_remote_code, dtype=dtype, **placement)
        except (OSError, KeyError, SafetensorError, ValueError) as err:
            raise HfCompressError(
                f"{path} is not a complete compressible directory ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else 'missing data'}); rerun `hf-compress compress`"
            ) from None
        has_tokenizer = (path / "tokenizer_config.json").is_file()
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code) if has_tokenizer else None
        config = AcipConfig.from_dict(meta["config"])
        return cls(base.eval(), layers, config, meta.get("summary"), tokenizer, units, windows)
