"""Where the units a block can lose live: MLP channels and key/value head groups.

A unit is an MLP channel (its rows in gate/up, its column in down), a channel of one expert of
a mixture-of-experts layer (the same, in that expert's Linears once the experts are unfused:
`unfuse_experts_`), or a key/value head group (a KV head with its query heads: rows in q/k/v,
columns in o). A `Site` names, for one block's
MLP or attention, the row ranges its units own on the input side and the column ranges on the
output side, for every family whose layout is known; `sites` finds those a config shrinks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from ..errors import HfCompressError
from ..formats import is_fused_experts
from ..layers import decoder_blocks, layer_shape
from .config import ShrinkConfig


@dataclass(frozen=True)
class Segment:
    """`units` consecutive units, each owning `per_unit` rows (or columns) from `start` on."""

    module: str  # path below the block
    start: int
    units: int
    per_unit: int


@dataclass(frozen=True)
class Site:
    kind: str  # "mlp", "experts" or "attention"
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
    raise HfCompressError(
        f"cannot {verb} the MLP of {type(block).__name__}: expected gate_proj/up_proj/down_proj, "
        "gate_up_proj/down_proj, c_fc/c_proj, fc1/fc2 or dense_h_to_4h/dense_4h_to_h"
    )


UNGATED_MLPS = (("mlp.c_fc", "mlp.c_proj"),  # GPT-2
                ("fc1", "fc2"),  # OPT: in the block itself
                ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"))  # GPT-NeoX, Falcon
MLP_WIDTHS = ("intermediate_size", "ffn_dim", "ffn_hidden_size", "n_inner")  # config names of the MLP width
EXPERT_WIDTHS = ("moe_intermediate_size", "intermediate_size")  # ... and of an expert's


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


HEAD_COUNTS = ("num_heads", "num_key_value_heads")  # attention attributes some models keep


def fused_experts_of(block: nn.Module) -> tuple[str, nn.Module] | None:
    """(path below the block, module) of the block's experts stored as 3-D stacks, if any."""
    return next(((name, m) for name, m in block.named_modules() if is_fused_experts(m)), None)


def expert_sites(block: nn.Module, config: ShrinkConfig) -> list[Site]:
    """One site per expert: its channels, in the Linears `ExpertLinears` gives it (`up.{e}`: gate
    and up rows, concatenated or interleaved; `down.{e}`: columns)."""
    path, experts = fused_experts_of(block)
    moe = block.get_submodule(path.rpartition(".")[0])
    beside = [name for name, child in moe.named_children() if child is not experts and any(
        p.shape[0] != experts.num_experts for p in child.parameters())]  # not the router
    if beside:
        raise HfCompressError(f"cannot {config.verb} the channels of {type(moe).__name__}'s experts beside its "
                              f"{'/'.join(beside)} yet; --ratio 1 --experts-ratio R {config.verb}s whole experts")
    if config.layers == "global":
        raise HfCompressError(f"{ing(config.verb)} the channels of experts needs a fixed schedule (--layers all keeps "
                              "the architecture)")
    width = experts.down_proj.shape[1 if experts.is_transposed else 2]
    found = []
    for e in range(experts.num_experts):
        up, down = f"{path}.up.{e}", f"{path}.down.{e}"
        if not experts.has_gate:
            reads = (Segment(up, 0, width, 1),)
        elif experts.is_concatenated:
            reads = (Segment(up, 0, width, 1), Segment(up, width, width, 1))
        else:  # gate and up rows interleaved: a channel owns two neighbouring rows
            reads = (Segment(up, 0, width, 2),)
        found.append(Site("experts", reads, (Segment(down, 0, width, 1),)))
    return found


def sites(model: PreTrainedModel, config: ShrinkConfig) -> list[tuple[int, float, Site]]:
    """(block, ratio, site) for every site `config` shrinks, in order; checks before anything changes.
    A block with experts gets a site per expert, in names that hold once its experts are unfused."""
    text_config = model.config.get_text_config()  # a composite model's language part
    _, blocks = decoder_blocks(model)
    plan = config.schedule(len(blocks))
    found = []
    for index, ratio in plan.items():
        if ratio < 1:  # (at 1 an MoE model can still lose whole experts)
            block = blocks[index]
            mlps = expert_sites(block, config) if fused_experts_of(block) else [mlp_site(block, config.verb)]
            found += [(index, ratio, site) for site in mlps]
        if config.heads_ratio < 1:
            found.append((index, config.heads_ratio, attention_site(blocks[index], text_config, config.verb)))
    return found


def ing(verb: str) -> str:
    return verb.removesuffix("e") + "ing"
