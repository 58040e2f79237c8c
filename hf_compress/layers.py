"""The layers we compress and what they cost: where a model's decoder blocks are, which of their
layers are targets, their shapes and dense weights whatever the layer type, bytes of weights."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from .errors import HfCompressError
from .modeling_hf_compress import FactorizedLinear


@dataclass(frozen=True)
class LayerShape:
    """What a targeted layer costs: a Linear (out x in) or transformers' Conv1D (stored in x out)."""

    in_features: int
    out_features: int
    bias: bool

    @property
    def dense_params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)

    def params_at_rank(self, rank: int, overhead: int = 0) -> int:
        """Factorized size, or dense where the factorization is not smaller (with `overhead`: not
        faster, see `is_dense_at`)."""
        bias = self.out_features if self.bias else 0
        if self.is_dense_at(rank, overhead):
            return self.in_features * self.out_features + bias
        return rank * (self.in_features + self.out_features) + bias

    def is_dense_at(self, rank: int, overhead: int = 0) -> bool:
        """Whether the layer is stored dense at `rank`: when its two factors hold at least as many
        weights as the matrix, plus `overhead` weights for the time of their second matmul call
        (`speed.call_overhead_params`; 0 compares sizes only). A layer so small that no
        factorization of it would be faster is left to the sizes alone: speed cannot decide
        between two slow forms, and the size budget must still be met."""
        size, width = self.in_features * self.out_features, self.in_features + self.out_features
        if overhead >= size - width:
            overhead = 0
        return rank * width + overhead >= size

    def to_json(self) -> dict:
        return {"in": self.in_features, "out": self.out_features, "bias": self.bias}

    @classmethod
    def from_json(cls, data: dict) -> LayerShape:
        return cls(data["in"], data["out"], data["bias"])


def layer_shape(module: nn.Module) -> LayerShape:
    if isinstance(module, FactorizedLinear):
        return LayerShape(module.in_features, module.out_features, module.proj_out.bias is not None)
    if isinstance(module, Conv1D):
        return LayerShape(module.weight.shape[0], module.weight.shape[1], module.bias is not None)
    return LayerShape(module.in_features, module.out_features, module.bias is not None)  # bitsandbytes too


def logical_numel(tensor: torch.Tensor) -> int:
    """Parameters a tensor stands for: a packed 4-bit weight holds two per byte."""
    state = getattr(tensor, "quant_state", None)
    return state.shape.numel() if state is not None else tensor.numel()


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as a checkpoint stores them (quantization states included,
    tied weights once), without the files' headers (see `files_bytes`)."""
    return sum(t.nbytes for t in stored_tensors(model))


# --- bytes on disk: safetensors files are a JSON header (one entry per tensor) and the data ----------

SHARD_BYTES = 50 * 10**9  # transformers' default max_shard_size
_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                torch.uint8: "U8", torch.int8: "I8", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL"}


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a checkpoint as its safetensors header lists it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def entry_bytes(self, offset_digits: int) -> int:
        """Its header entry, with offsets of at most `offset_digits` digits, and a separator."""
        shape = ",".join(map(str, self.shape))
        return len(f'"{self.name}":{{"dtype":"{_DTYPE_NAMES[self.dtype]}","shape":[{shape}],"data_offsets":[,]}},') \
            + 2 * offset_digits


def stored_tensors(model: nn.Module) -> list[StoredTensor]:
    """What `save_pretrained` writes of a model: its state, tied weights once (weights Accelerate
    offloaded sit on the meta device, where every tensor has address 0: one object is one tensor)."""
    objects = {name: id(t) for name, t in [*model.named_parameters(remove_duplicate=False),
                                           *model.named_buffers(remove_duplicate=False)]}
    seen, tensors = set(), []
    for name, tensor in model.state_dict().items():
        key = ("meta", objects.get(name, name)) if tensor.is_meta else (tensor.device, tensor.data_ptr(), tensor.nbytes)
        if not tensor.nbytes or key not in seen:  # an empty factor (rank 0) is still listed
            seen.add(key)
            tensors.append(StoredTensor(name, tensor.dtype, tuple(tensor.shape)))
    return tensors


def files_bytes(tensors: list[StoredTensor], shard_bytes: int = SHARD_BYTES) -> int:
    """Bytes of the safetensors files holding `tensors`, headers included (at most: every offset
    counted at the largest width), and the index that lists them when they need several shards."""
    data = sum(t.nbytes for t in tensors)
    digits = len(str(data))
    shards = max(1, -(-data // shard_bytes)) + (data > shard_bytes)  # a tensor never straddles two shards
    per_shard = len('{"__metadata__":{"format":"pt"}}') + 8 + 7  # the length field, padding to 8 bytes
    header = sum(t.entry_bytes(digits) for t in tensors) + shards * per_shard
    index = 0 if shards == 1 else 256 + sum(len(t.name) + 40 for t in tensors)  # "name": "model-0000x-of-0000y..."
    return data + header + index


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight as out x in, whatever the layer type stores."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def set_dense_weight(module: nn.Module, weight: torch.Tensor) -> None:
    weight = weight.t() if isinstance(module, Conv1D) else weight
    module.weight.data = weight.to(module.weight.dtype).contiguous()


def decoder_blocks(model: PreTrainedModel) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding the text decoder's blocks (model.layers, transformer.h, ...); in a
    composite model (Gemma 3, vision-language models) those of its language model."""
    n_layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    within = next((name for name, module in model.named_modules() if module is decoder), "") if decoder else ""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and name.startswith(within):
            return name, module
    raise HfCompressError(
        f"unsupported architecture {type(model).__name__}: no list of {n_layers} decoder blocks found"
    )


def find_targets(
    model: PreTrainedModel, include: str | None = None, exclude: str | None = None
) -> dict[str, nn.Module]:
    """Every Linear / Conv1D inside the decoder blocks whose name matches `include` (a regex,
    default all) and not `exclude`. A matched module of another type is an error."""
    prefix, blocks = decoder_blocks(model)
    targets = {}
    for name, module in blocks.named_modules():
        full = f"{prefix}.{name}"
        if not name or (include and not re.search(include, full)):
            continue
        if any(full.startswith(f"{t}.") for t in targets):
            continue  # inside a FactorizedLinear already listed
        if exclude and re.search(exclude, full):
            continue
        if isinstance(module, (nn.Linear, Conv1D, FactorizedLinear)):
            targets[full] = module
        elif include and not list(module.children()) and sum(p.numel() for p in module.parameters()):
            raise HfCompressError(
                f"unsupported layer type {type(module).__name__} at {full}: "
                "only nn.Linear and transformers Conv1D can be compressed"
            )
    if not targets:
        raise HfCompressError(
            f"no Linear layers to compress in {type(model).__name__}"
            + (f" matching include={include!r} exclude={exclude!r}" if include or exclude else "")
        )
    return targets


def expert_params(model: PreTrainedModel) -> dict[str, int]:
    """Weights in the decoder blocks stored as stacks of matrices (mixture-of-experts layers, kept
    as 3-D parameters by transformers 5): not Linear layers, so not compressed yet."""
    prefix, blocks = decoder_blocks(model)
    return {f"{prefix}.{name}": p.numel() for name, p in blocks.named_parameters() if p.dim() > 2}


def shrinkable_params(model: PreTrainedModel) -> int:
    """Parameters of what fold and prune shrink: the targeted layers and the experts' stacks."""
    return sum(layer_shape(m).dense_params for m in find_targets(model).values()) + sum(expert_params(model).values())


def require_dense(model: PreTrainedModel, action: str, factorized_hint: str) -> None:
    """Folding and compressing read dense float weights: refuse, in one sentence, models whose
    targeted layers are quantized or already factorized."""
    if getattr(model.config, "quantization_config", None) is not None:
        raise HfCompressError(f"cannot {action} a quantized model: {action} the unquantized model, then quantize")
    if any(isinstance(m, FactorizedLinear) for m in find_targets(model).values()):
        raise HfCompressError(f"cannot {action} a model with factorized (ACIP) layers: {factorized_hint}")
