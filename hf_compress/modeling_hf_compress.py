"""Factorized Linear layers for checkpoints written by hf-compress.

This file is copied verbatim into every materialized checkpoint, followed by a few generated
lines that subclass the base architecture, so that
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` works with only torch and
transformers installed. It must import nothing but torch and transformers.

`config.hf_compress["experts"]` names the mixture-of-experts layers stored one Linear per
expert and matrix, `config.hf_compress["shapes"]` maps a module name to its [in, out] size
(layers folded to different sizes in different blocks) and `config.hf_compress["ranks"]` to the
rank it is stored at; every other module is the base architecture's own.
"""

import warnings

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


class ExpertLinears(nn.Module):
    """A transformers experts module (each matrix of every expert in one 3-D stack) as one Linear
    per expert and matrix, `up[e]` (gate and up together) and `down[e]`, so that each can be
    factorized or resized on its own. Routes tokens as transformers' eager forward does; the
    original module stays inside, without its weights, for its gating function."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        if getattr(experts, "has_post_expert_norm", False):
            raise ValueError(f"{type(experts).__name__} normalizes each expert's output: not supported")
        self.num_experts = getattr(experts, _first_stack(experts)).shape[0]
        self.up = _expert_linears(experts, _first_stack(experts))
        self.down = _expert_linears(experts, "down_proj")
        for name in [name for name, _ in experts.named_parameters(recurse=False)]:
            delattr(experts, name)
        self.gating = experts

    def fused(self) -> nn.Module:
        """The transformers module again, its stacks made of the Linears (at their current widths:
        every expert of one width)."""
        experts = self.gating
        for name, linears in ((_first_stack(experts), self.up), ("down_proj", self.down)):
            weights = [layer.weight.t() if experts.is_transposed else layer.weight for layer in linears]
            setattr(experts, name, nn.Parameter(torch.stack(weights).detach()))
            if linears[0].bias is not None:
                setattr(experts, f"{name}_bias", nn.Parameter(torch.stack([layer.bias for layer in linears]).detach()))
        width = self.down[0].in_features
        for attribute in ("intermediate_dim", "intermediate_size"):
            if hasattr(experts, attribute):
                setattr(experts, attribute, width)
        experts.num_experts = len(self.up)
        return experts

    def forward(self, hidden_states, top_k_index=None, top_k_weights=None, router_indices=None, routing_weights=None):
        index = top_k_index if top_k_index is not None else router_indices  # gpt-oss names them so
        weights = top_k_weights if top_k_weights is not None else routing_weights
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            routed = nn.functional.one_hot(index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = routed[: self.num_experts].sum(dim=(-1, -2)).nonzero().flatten().tolist()
        for expert in hit:
            position, token = torch.where(routed[expert])
            h = self.up[expert](hidden_states[token])
            h = self.gating._apply_gate(h) if self.gating.has_gate else self.gating.act_fn(h)
            h = self.down[expert](h) * weights[token, position, None]
            out.index_add_(0, token, h.to(out.dtype))
        return out


def _first_stack(experts: nn.Module) -> str:
    """The name of the stack the tokens meet first: gate and up together, or up alone."""
    return "gate_up_proj" if experts.has_gate else "up_proj"


def _expert_linears(experts: nn.Module, name: str) -> nn.ModuleList:
    """The stack `name` (with its bias stack, if any) as one Linear per expert, sharing nothing."""
    stack, bias = getattr(experts, name), getattr(experts, f"{name}_bias", None)
    linears = nn.ModuleList()
    for e in range(stack.shape[0]):
        weight = stack[e].t() if experts.is_transposed else stack[e]
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        layer.weight = nn.Parameter(weight.clone(memory_format=torch.contiguous_format), requires_grad=stack.requires_grad)
        if bias is not None:
            layer.bias = nn.Parameter(bias[e].clone(), requires_grad=bias.requires_grad)
        linears.append(layer)
    return linears


def unfuse_experts_(model: nn.Module, names) -> nn.Module:
    """Replace each experts module named in `names` by its ExpertLinears."""
    for name in names:
        set_module_(model, name, ExpertLinears(model.get_submodule(name)))
    return model


def set_module_(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted path `name` of `model`, in place of what is there."""
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, module)


def replace_layer_(model: nn.Module, name: str, make) -> None:
    """Swap the layer at `name` for `make(old, in_features, out_features)`, on its device and dtype."""
    old = model.get_submodule(name)
    if hasattr(old, "nf"):  # transformers Conv1D stores its weight as in x out
        in_features, out_features = old.weight.shape
    else:
        in_features, out_features = old.in_features, old.out_features
    new = make(old, in_features, out_features)
    set_module_(model, name, new.to(device=old.weight.device, dtype=old.weight.dtype))


def factorize_(model: nn.Module, ranks: dict) -> nn.Module:
    """Replace each module named in `ranks` by an (uninitialized) FactorizedLinear of that rank."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")  # rank 0: every value removed
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
        unfuse_experts_(self, config.hf_compress.get("experts", []))
        resize_(self, config.hf_compress.get("shapes", {}))
        factorize_(self, config.hf_compress.get("ranks", {}))
