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
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..checkpoint import mark_compressed
from ..errors import HfCompressError
from ..io import atomic_dir
from ..models import LayerShape, dense_weight, read_json, set_dense_weight
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

    def params(self, rank: int) -> int:
        """Parameters when `rank` singular values are kept; LoRA is stacked into the factors."""
        return self.shape.params_at_rank(rank + self.lora_rank)

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

    def ranks_at(self, size_ratio: float) -> dict[str, int]:
        """Per-layer ranks for the largest prefix of the global order that fits the budget."""
        if not 0 < size_ratio <= 1:
            raise HfCompressError(f"size ratio must be in (0, 1], got {size_ratio}")
        budget = size_ratio * self.dense_params
        factors = list(self.layers.values())

        def ranks_for(k: int) -> list[int]:
            return torch.bincount(self._order[:k], minlength=len(factors)).tolist()

        def cost(k: int) -> int:
            return sum(f.params(r) for f, r in zip(factors, ranks_for(k)))

        lo, hi = 0, len(self._order)  # cost(lo) <= budget; find the largest such k
        if cost(lo) > budget:
            raise HfCompressError(f"size ratio {size_ratio} is below what the LoRA adapters alone cost")
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if cost(mid) <= budget else (lo, mid - 1)
        return dict(zip(self.layers, ranks_for(lo)))

    def uniform_ranks(self, size_ratio: float) -> dict[str, int]:
        """Every layer at `size_ratio` of its own size (the uniform-allocation baseline)."""
        ranks = {}
        for name, f in self.layers.items():
            budget, rank = size_ratio * f.shape.dense_params, len(f.score)
            while rank and f.params(rank) > budget:
                rank -= 1
            ranks[name] = rank
        return ranks

    def materialize(self, size_ratio: float | None = None, ranks: dict[str, int] | None = None) -> PreTrainedModel:
        """A transformers model at `size_ratio` of the targeted parameters: factorized layers
        become two small Linears; layers that end up dense are rebuilt at full rank; LoRA merged.
        Explicit per-layer `ranks` (each layer's best values first) override the global order."""
        start = time.perf_counter()
        ranks = self.ranks_at(size_ratio) if ranks is None else ranks
        model = copy.deepcopy(self.base_model)
        factorized, params = {}, 0
        for name, rank in ranks.items():
            f = self.layers[name]
            params += f.params(rank)
            module = model.get_submodule(name)
            if f.shape.is_dense_at(rank + f.lora_rank):
                delta = f.lora_delta()
                if delta is not None:
                    set_dense_weight(module, dense_weight(module).float() + delta.float())
            else:
                factorized[name] = (rank + f.lora_rank, module.bias)
        factorize_(model, {name: r for name, (r, _) in factorized.items()})
        for name, (_, bias) in factorized.items():
            self._fill(model.get_submodule(name), self.layers[name], ranks[name], bias)
        mark_compressed(
            model,
            ranks={name: r for name, (r, _) in factorized.items()},
            method="acip",
            source=self.summary.get("source"),
            size_ratio=round(params / self.dense_params, 6),
            target_params=params,
            target_dense_params=self.dense_params,
        )
        model.materialize_seconds = time.perf_counter() - start
        return model.eval()

    @staticmethod
    def _fill(module, f: LayerFactors, rank: int, bias) -> None:
        proj_in = f.s[:rank, None] * f.vt[:rank].float()
        proj_out = f.u[:, :rank].float()
        if f.lora_a is not None:
            proj_in = torch.cat([proj_in, f.lora_a.float()])
            proj_out = torch.cat([proj_out, f.lora_b.float()], dim=1)
        dtype = module.proj_in.weight.dtype
        module.proj_in.weight.data = proj_in.to(dtype).contiguous()
        module.proj_out.weight.data = proj_out.to(dtype).contiguous()
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
        return Path(output)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> CompressibleModel:
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
            base = AutoModelForCausalLM.from_pretrained(path)
        except (OSError, KeyError, SafetensorError, ValueError) as err:
            raise HfCompressError(
                f"{path} is not a complete compressible directory ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else 'missing data'}); rerun `hf-compress compress`"
            ) from None
        has_tokenizer = (path / "tokenizer_config.json").is_file()
        tokenizer = AutoTokenizer.from_pretrained(path) if has_tokenizer else None
        config = AcipConfig.from_dict(meta["config"])
        return cls(base.eval(), layers, config, meta.get("summary"), tokenizer)
