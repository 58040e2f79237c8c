"""Factorized Linear layers for checkpoints written by hf-compress.

This file is copied verbatim into every materialized checkpoint, followed by a few generated
lines that subclass the base architecture, so that
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` works with only torch and
transformers installed. It must import nothing but torch and transformers.

`config.hf_compress["shapes"]` maps a module name to its [in, out] size (layers folded to
different sizes in different blocks) and `config.hf_compress["ranks"]` to the rank it is
stored at; every other module is the base architecture's own.
"""

import torch
from torch import nn


class FactorizedLinear(nn.Module):
    """y = W2 (W1 x) + b with W1: rank x in, W2: out x rank; a rank-limited stand-in for Linear."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.proj_in = nn.Linear(in_features, rank, bias=False)
        self.proj_out = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.proj_in(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def replace_layer_(model: nn.Module, name: str, make) -> None:
    """Swap the layer at `name` for `make(old, in_features, out_features)`, on its device and dtype."""
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, child_name)
    if hasattr(old, "nf"):  # transformers Conv1D stores its weight as in x out
        in_features, out_features = old.weight.shape
    else:
        in_features, out_features = old.in_features, old.out_features
    new = make(old, in_features, out_features)
    setattr(parent, child_name, new.to(device=old.weight.device, dtype=old.weight.dtype))


def factorize_(model: nn.Module, ranks: dict) -> nn.Module:
    """Replace each module named in `ranks` by an (uninitialized) FactorizedLinear of that rank."""
    for name, rank in ranks.items():
        replace_layer_(model, name, lambda old, i, o: FactorizedLinear(i, o, rank, bias=old.bias is not None))
    return model


def layer_like(old: nn.Module, in_features: int, out_features: int) -> nn.Module:
    """A fresh layer of the same type as `old` (Linear or Conv1D, same bias) with other sizes."""
    if hasattr(old, "nf"):
        return type(old)(out_features, in_features)
    return nn.Linear(in_features, out_features, bias=old.bias is not None)


def resize_(model: nn.Module, shapes: dict) -> nn.Module:
    """Replace each module named in `shapes` by an (uninitialized) layer of the same type with
    [in_features, out_features] as given: folded layers whose sizes differ between blocks."""
    for name, (in_features, out_features) in shapes.items():
        replace_layer_(model, name, lambda old, i, o: layer_like(old, in_features, out_features))
    return model


class HfCompressMixin:
    """Put before a transformers *ForCausalLM class: builds resized and factorized layers."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        resize_(self, config.hf_compress.get("shapes", {}))
        factorize_(self, config.hf_compress.get("ranks", {}))
