"""The result of one ACIP pass: a model that can be materialized at any size in about a second.

On disk a compressible directory is the original model (config, tokenizer, `model.safetensors`)
plus `acip.safetensors` (per layer: U, s, Vt and scores, sorted so the values to keep first come
first and truncated where the layer would be dense anyway; LoRA factors) and `acip.json`
(settings, layer shapes, a summary of the pass).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, PreTrainedModel

from ..cards import write_card
from ..checkpoint import mark_compressed, model_class_for
from ..errors import HfCompressError
from ..io import atomic_dir
from ..models import LayerShape, dense_weight, load_config, read_json, set_dense_weight, tensor_bytes
from ..quantize import linear_bytes, quantize as quantize_model, width_multiple
from ..speed import call_overhead_params
from ..modeling_hf_compress import factorize_
from .config import AcipConfig

FACTORS_FILE = "acip.safetensors"
META_FILE = "acip.json"
FORMAT_VERSION = 1
FACTOR_KEYS = ("u", "s", "vt", "score")


@dataclass
class LayerFactors:
    """One layer's singular triplets in keep order (best first), and its LoRA adapter."""

    shape: LayerShape
    u: torch.Tensor  # out x r
    s: torch.Tensor  # r
    vt: torch.Tensor  # r x in
    score: torch.Tensor  # r, non-increasing
    lora_a: torch.Tensor | None = None  # q x in
    lora_b: torch.Tensor | None = None  # out x q (already scaled)

    @property
    def lora_rank(self) -> int:
        return 0 if self.lora_a is None else self.lora_a.shape[0]

    def params(self, rank: int, overhead: int = 0) -> int:
        """Parameters when `rank` singular values are kept; LoRA is stacked into the factors."""
        return self.shape.params_at_rank(rank + self.lora_rank, overhead)

    def is_dense_at(self, rank: int, overhead: int = 0) -> bool:
        return self.shape.is_dense_at(rank + self.lora_rank, overhead)

    def rounded(self, rank: int, multiple: int) -> int:
        """`rank` raised so that the stacked rank (with LoRA) is a multiple of `multiple`, within
        the stored values (all of them: the layer is stored dense)."""
        total = rank + self.lora_rank
        if multiple == 1 or total == 0:
            return rank
        return min(-(-total // multiple) * multiple - self.lora_rank, len(self.score))

    def bytes(self, rank: int, quantize: str | None, dtype_bytes: int, overhead: int = 0) -> int:
        """Checkpoint bytes of this layer at `rank`: dense, or two factor Linears."""
        shape, total = self.shape, rank + self.lora_rank
        bias = shape.out_features * dtype_bytes if shape.bias else 0
        if shape.is_dense_at(total, overhead):
            return linear_bytes(shape.in_features, shape.out_features, quantize, dtype_bytes) + bias
        return (linear_bytes(shape.in_features, total, quantize, dtype_bytes)
                + linear_bytes(total, shape.out_features, quantize, dtype_bytes) + bias)

    def lora_delta(self) -> torch.Tensor | None:
        return None if self.lora_a is None else self.lora_b @ self.lora_a


class CompressibleModel:
    """A dense base model plus the score-ordered factors of every targeted layer."""

    def __init__(self, base_model, layers: dict[str, LayerFactors], config: AcipConfig,
                 summary: dict | None = None, tokenizer=None):
        self.base_model = base_model
        self.layers = layers
        self.config = config
        self.summary = summary or {}
        self.tokenizer = tokenizer
        self._order = self._global_order()
        self._fixed_bytes = None  # weights outside the targeted layers, measured on first use

    @property
    def dense_params(self) -> int:
        return sum(f.shape.dense_params for f in self.layers.values())

    def _global_order(self) -> torch.Tensor:
        """Layer index of every stored value, in global keep order: higher score first, ties
        broken by larger singular value, then by layer and position (fully deterministic)."""
        scores = torch.cat([f.score.double() for f in self.layers.values()])
        svals = torch.cat([f.s.double() for f in self.layers.values()])
        layer_ids = torch.cat([torch.full((len(f.score),), i) for i, f in enumerate(self.layers.values())])
        order = torch.sort(svals, descending=True, stable=True).indices
        order = order[torch.sort(scores[order], descending=True, stable=True).indices]
        return layer_ids[order]

    def ranks_at(self, size_ratio: float, multiple: int = 1, overhead: int = 0) -> dict[str, int]:
        """Per-layer ranks for the largest prefix of the global order within `size_ratio` of the
        targeted parameters; with `multiple`, ranks are rounded up to multiples of it (and so
        counted); `overhead`: see `LayerShape.is_dense_at`."""
        if not 0 < size_ratio <= 1:
            raise HfCompressError(f"size ratio must be in (0, 1], got {size_ratio}")
        budget = size_ratio * self.dense_params
        return self._largest_prefix(lambda ranks: self.params_of(ranks, overhead) <= budget, multiple,
                                    f"size ratio {size_ratio}")

    def ranks_within(self, max_bytes: int, quantize: str | None = None, overhead: int = 0) -> dict[str, int]:
        """Per-layer ranks of the largest model whose weights take at most `max_bytes`."""
        return self._largest_prefix(lambda ranks: self.checkpoint_bytes(ranks, quantize, overhead) <= max_bytes,
                                    width_multiple(quantize), f"{max_bytes / 2**20:.1f} MiB")

    def _largest_prefix(self, fits, multiple: int, budget: str) -> dict[str, int]:
        """Binary search for the longest prefix of the global order whose ranks `fits` (cost grows
        with the prefix, so the search is exact)."""
        factors = list(self.layers.values())

        def ranks_for(k: int) -> dict[str, int]:
            counts = torch.bincount(self._order[:k], minlength=len(factors)).tolist()
            return {name: f.rounded(c, multiple) for (name, f), c in zip(self.layers.items(), counts)}

        lo, hi = 0, len(self._order)
        if not fits(ranks_for(lo)):
            raise HfCompressError(f"{budget} is below the smallest model this pass can make "
                                  "(what is not factorized, and LoRA adapters, cost more)")
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(ranks_for(mid)) else (lo, mid - 1)
        return ranks_for(lo)

    def params_of(self, ranks: dict[str, int], overhead: int = 0) -> int:
        return sum(self.layers[name].params(rank, overhead) for name, rank in ranks.items())

    def checkpoint_bytes(self, ranks: dict[str, int], quantize: str | None = None, overhead: int = 0) -> int:
        """Bytes of the weights of the model these ranks make, quantized or not (the output head
        counted in float), as `models.tensor_bytes` measures the built model."""
        if self._fixed_bytes is None:
            self._fixed_bytes = tensor_bytes(self.base_model) - sum(
                f.shape.dense_params * self.base_model.dtype.itemsize for f in self.layers.values())
        dtype_bytes = self.base_model.dtype.itemsize
        return self._fixed_bytes + sum(self.layers[name].bytes(rank, quantize, dtype_bytes, overhead)
                                       for name, rank in ranks.items())

    def uniform_ranks(self, size_ratio: float) -> dict[str, int]:
        """Every layer at `size_ratio` of its own size (the uniform-allocation baseline)."""
        ranks = {}
        for name, f in self.layers.items():
            budget, rank = size_ratio * f.shape.dense_params, len(f.score)
            while rank and f.params(rank) > budget:
                rank -= 1
            ranks[name] = rank
        return ranks

    def materialize(self, size_ratio: float | None = None, *, ranks: dict[str, int] | None = None,
                    max_bytes: int | None = None, quantize: str | None = None,
                    quantize_head: bool = False, speed_aware: bool | int = False) -> PreTrainedModel:
        """A transformers model at `size_ratio` of the targeted parameters, or the largest whose
        weights fit `max_bytes`: factorized layers become two small Linears, layers that end up
        dense are rebuilt at full rank, LoRA is merged. Explicit per-layer `ranks` (each layer's
        best values first) override the global order. `quantize` (nf4, fp4, int8) returns it
        quantized with bitsandbytes, its ranks rounded to what the 4-bit kernel packs.

        `speed_aware=True` keeps a layer dense, within the same budget, where its two factors would
        not decode faster than the matrix on the device of this model (measured:
        `speed.call_overhead_params`); an int gives that overhead in weights instead."""
        start = time.perf_counter()
        multiple = width_multiple(quantize)
        overhead = self.speed_overhead() if speed_aware is True else int(speed_aware)
        if ranks is None:
            if (size_ratio is None) == (max_bytes is None):
                raise HfCompressError("give exactly one of a size ratio and a byte budget")
            ranks = (self.ranks_at(size_ratio, multiple, overhead) if max_bytes is None
                     else self.ranks_within(max_bytes, quantize, overhead))
        model = self._build(ranks, overhead, width_multiple=multiple)
        if quantize:
            model = quantize_model(model, quantize, quantize_head)
        model.materialize_seconds = time.perf_counter() - start
        return model

    def ratio_within_loss(self, windows: torch.Tensor, max_increase: float, quantize: str | None = None,
                          resolution: float = 0.01, report=None) -> tuple[float, dict]:
        """The smallest size ratio (on a grid of `resolution`) whose mean loss on `windows`, held
        aside from calibration, stays within (1 + max_increase) x the dense model's: TAMADE's idea
        (arXiv 2505.17469). Binary search over materializations in memory (loss grows as the size
        shrinks); `report(ratio, loss, fits)` sees each try. Returns the ratio and the search."""
        from ..evaluate import perplexity

        if not 0 < max_increase < 10:
            raise HfCompressError(f"the loss increase must be in (0, 10), got {max_increase}")
        dense = perplexity(self.base_model, windows)["loss"]
        limit = (1 + max_increase) * dense
        search = {"dense_loss": dense, "limit": limit, "max_increase": max_increase, "tries": []}

        def fits(step: int) -> bool:
            ratio = round(step * resolution, 6)
            try:
                loss = perplexity(self.materialize(ratio, quantize=quantize), windows)["loss"]
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
        parameter = next(self.base_model.parameters())
        return call_overhead_params(parameter.device, parameter.dtype)

    def _build(self, ranks: dict[str, int], overhead: int = 0, **info) -> PreTrainedModel:
        model = copy.deepcopy(self.base_model)
        factorized = {}
        for name, rank in ranks.items():
            f = self.layers[name]
            module = model.get_submodule(name)
            if f.is_dense_at(rank, overhead):
                delta = f.lora_delta()
                if delta is not None:
                    set_dense_weight(module, dense_weight(module).float() + delta.to(module.weight.device).float())
            else:
                factorized[name] = (rank + f.lora_rank, module.bias)
        factorize_(model, {name: r for name, (r, _) in factorized.items()})
        for name, (_, bias) in factorized.items():
            self._fill(model.get_submodule(name), self.layers[name], ranks[name], bias)
        params = self.params_of(ranks, overhead)
        if overhead:
            info["speed_overhead_params"] = overhead
        recorded = ("source_params", "source_bytes", "dataset", "seq_len", "windows")  # for the model card
        carried = {key: self.summary[key] for key in recorded if key in self.summary}
        mark_compressed(model, ranks={name: r for name, (r, _) in factorized.items()}, method="acip",
                        objective=self.config.objective,
                        source=self.summary.get("source"), size_ratio=round(params / self.dense_params, 6),
                        target_params=params, target_dense_params=self.dense_params, **carried, **info)
        return model.eval()

    def to(self, device=None, dtype: torch.dtype | None = None) -> CompressibleModel:
        """Materialize on `device` in `dtype` from now on (the stored factors stay fp32 on CPU)."""
        self.base_model.to(device=device, dtype=dtype)
        self._fixed_bytes = None
        return self

    @staticmethod
    def _fill(module, f: LayerFactors, rank: int, bias) -> None:
        proj_in = f.s[:rank, None] * f.vt[:rank].float()
        proj_out = f.u[:, :rank].float()
        if f.lora_a is not None:
            proj_in = torch.cat([proj_in, f.lora_a.float()])
            proj_out = torch.cat([proj_out, f.lora_b.float()], dim=1)
        module.proj_in.weight.data = proj_in.to(module.proj_in.weight).contiguous()
        module.proj_out.weight.data = proj_out.to(module.proj_out.weight).contiguous()
        if bias is not None:
            module.proj_out.bias.data = bias.data.clone()

    # --- persistence ---------------------------------------------------------------------

    def save_pretrained(self, output: str | Path, overwrite: bool = False) -> Path:
        tensors = {}
        for name, f in self.layers.items():
            for key in FACTOR_KEYS:
                tensors[f"{name}.{key}"] = getattr(f, key).contiguous()
            if f.lora_a is not None:
                tensors[f"{name}.lora_a"] = f.lora_a.contiguous()
                tensors[f"{name}.lora_b"] = f.lora_b.contiguous()
        meta = {
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "layers": {name: f.shape.to_json() for name, f in self.layers.items()},
            "summary": self.summary,
        }
        with atomic_dir(output, overwrite=overwrite) as tmp:
            self.base_model.save_pretrained(tmp)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            save_file(tensors, tmp / FACTORS_FILE)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
            write_card(tmp, Path(output).name)
        return Path(output)

    @classmethod
    def from_pretrained(cls, path: str | Path, trust_remote_code: bool = False) -> CompressibleModel:
        """Load a compressible directory; `trust_remote_code` when its model runs its own code."""
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
            tensors = load_file(path / FACTORS_FILE)
            layers = {}
            for name, shape in meta["layers"].items():
                parts = {k: tensors[f"{name}.{k}"] for k in FACTOR_KEYS}
                lora = {k: tensors.get(f"{name}.{k}") for k in ("lora_a", "lora_b")}
                layers[name] = LayerFactors(LayerShape.from_json(shape), **parts, **lora)
            config = load_config(path, trust_remote_code)
            base = model_class_for(config, trust_remote_code).from_pretrained(  # folded bases too
                path, trust_remote_code=trust_remote_code)
        except (OSError, KeyError, SafetensorError, ValueError) as err:
            raise HfCompressError(
                f"{path} is not a complete compressible directory ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else 'missing data'}); rerun `hf-compress compress`"
            ) from None
        has_tokenizer = (path / "tokenizer_config.json").is_file()
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code) if has_tokenizer else None
        config = AcipConfig.from_dict(meta["config"])
        return cls(base.eval(), layers, config, meta.get("summary"), tokenizer)
