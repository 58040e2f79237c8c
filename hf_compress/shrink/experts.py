"""Fewer experts, same architecture: each mixture-of-experts layer keeps `experts_ratio` of its
experts, each new expert the mean of a group of old ones (their stacked weights and router rows).

A selection decides the groups (`Selection.expert_groups`): k-means folding merges experts whose
weights are close; activation pruning keeps, alone, the experts that carry the most
router-weighted output on calibration text (`selection.routed_outputs`). Every layer keeps the same number, so the config's
expert count shrinks and plain transformers loads the result. Merging a group of identical
experts (with identical router rows) gives back what one of them computed; what merging
different experts costs in quality is unmeasured here (no trained MoE fits this machine).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from ..errors import HfCompressError
from ..formats import is_fused_experts
from ..layers import decoder_blocks
from .rewrite import kept_units

EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts")  # config names across families


@dataclass
class MoELayer:
    """One block's experts (transformers' 3-D stacks) and the router beside them."""

    name: str
    experts: nn.Module
    router: nn.Module

    @property
    def count(self) -> int:
        return self.experts.num_experts

    def features(self) -> torch.Tensor:
        """Each expert's weights flattened (E x d): what k-means compares."""
        return torch.cat([p.detach().float().reshape(self.count, -1) for p in self.experts.parameters(recurse=False)],
                         dim=1)


def moe_layers(model: PreTrainedModel) -> list[MoELayer]:
    """Every mixture-of-experts layer in the decoder blocks, with its router (the sibling module
    whose weight has one row per expert)."""
    prefix, blocks = decoder_blocks(model)
    layers = []
    for name, module in blocks.named_modules():
        if not is_fused_experts(module):
            continue
        parent = blocks.get_submodule(name.rpartition(".")[0])
        router = next((m for m in parent.children() if m is not module and getattr(m, "weight", None) is not None
                       and m.weight.dim() == 2 and m.weight.shape[0] == module.num_experts), None)
        if router is None:
            raise HfCompressError(f"cannot find the router of {prefix}.{name}: expected a sibling with one weight row "
                                  "per expert")
        layers.append(MoELayer(f"{prefix}.{name}", module, router))
    return layers


def check_experts(model: PreTrainedModel, ratio: float, verb: str) -> tuple[list[MoELayer], int]:
    """The layers an experts ratio applies to and the experts each keeps, refused in one sentence
    where it cannot."""
    layers = moe_layers(model)
    text_config = model.config.get_text_config()
    if not layers:
        raise HfCompressError(f"--experts-ratio needs a mixture-of-experts model; {type(model).__name__} has no "
                              "experts stored as 3-D tensors")
    if getattr(text_config, "n_group", 1) not in (None, 1):
        raise HfCompressError(f"cannot {verb} experts of a model that routes within expert groups (n_group "
                              f"{text_config.n_group}): the groups would no longer divide the experts")
    k = kept_units(ratio, layers[0].count)
    top_k = getattr(text_config, "num_experts_per_tok", 1)
    if k < top_k:
        raise HfCompressError(f"--experts-ratio {ratio} keeps {k} experts per layer, fewer than the {top_k} each "
                              "token is routed to")
    return layers, k


@torch.no_grad()
def regroup(layer: MoELayer, groups: list[torch.Tensor]) -> None:
    """Layer `layer` with one expert per group, the mean of its members: their weights, biases
    and router rows (router tensors with one entry per expert)."""
    n = layer.count
    for module in (layer.experts, layer.router):
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor.shape[0] != n:
                continue
            merged = torch.stack([tensor[group.to(tensor.device)].float().mean(0) for group in groups])
            tensor.data = merged.to(tensor.dtype).contiguous()
        if hasattr(module, "num_experts"):
            module.num_experts = len(groups)


def set_expert_count(model: PreTrainedModel, count: int) -> None:
    config = model.config.get_text_config()
    for name in EXPERT_COUNTS:
        if hasattr(config, name):
            setattr(config, name, count)


def fewer_experts(model: PreTrainedModel, ratio: float, selection, data: torch.Tensor | None, verb: str,
                  show_progress: bool = True) -> dict:
    """Keep `ratio` of the experts of every MoE layer, grouped as `selection` decides; returns
    what the checkpoint records."""
    layers, k = check_experts(model, ratio, verb)
    n = layers[0].count
    for layer, groups in zip(layers, selection.expert_groups(model, layers, k, data, show_progress), strict=True):
        regroup(layer, groups)
    set_expert_count(model, k)
    return {"expert_count": {"before": n, "after": k}}
