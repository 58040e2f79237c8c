"""The memory plan of `compress`, from the config alone: a model built on the meta device has
every shape and no weights, so a 70B plan costs a config download.

Per process, in bytes, for each stage of `compress` and for `materialize`:
- whitening and SVD: the model, the first block's inputs for the whitening windows, one block's
  input covariances (fp32) with one Cholesky factor, and the fp32 SVD of the largest layer, while
  the factors of the blocks done so far accumulate (the originals leave the device as they are
  replaced: on a GPU they wait in host memory; on CPU they are the same memory);
- the pass: what is not factorized, the factors (model dtype; masks, scores, gradients fp32),
  the activations (with gradient checkpointing: every block's input plus one block's
  activations) and the loss over the vocabulary;
- materialization (host): the dense base, the stored factors, and the copy being built.
Activation sizes per token come from counting what autograd keeps for a decoder block with the
SVD layers; bench/scale.py checks the whole plan against measured peaks.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch

from .acip.config import LORA_RANK
from .formats import empty_model, unfuse_experts
from .layers import LayerShape, decoder_blocks, find_targets, layer_shape
from .loading import load_config

# A layer that writes a block's residual output reads an input of its own; the others read
# the input they share with their siblings (q/k/v, gate/up).
OUTPUT_LAYERS = re.compile(r"(o_proj|out_proj|dense|c_proj|down_proj|fc2|dense_4h_to_h|w2|wo)$")
PER_VALUE_BYTES = 4 + 4 + 4 + 4 + 1 + 8  # s, mask, mask gradient, score (fp32), alive, stored position
SVD_WORKSPACE = 3  # fp32 copies of a layer alive during its SVD (W, W L, LAPACK's working copy)


@dataclass
class Stage:
    name: str
    device_bytes: int  # per process, on the device the pass runs on
    host_bytes: int  # per process, in CPU memory beside it (equal to device on CPU)


@dataclass
class MemoryPlan:
    stages: list[Stage]
    capacity_bytes: int | None  # what the detected device offers (per process)

    @property
    def peak_bytes(self) -> int:
        """The compress stages' peak on the device (materialize runs on the host, afterwards)."""
        return max(stage.device_bytes for stage in self.stages if stage.name != "materialize")

    @property
    def fits(self) -> bool | None:
        return None if self.capacity_bytes is None else self.peak_bytes <= self.capacity_bytes


def _targets_by_block(model) -> list[list[tuple[str, LayerShape]]]:
    prefix, blocks = decoder_blocks(model)
    per_block = [[] for _ in blocks]
    for name, module in find_targets(model).items():
        index = int(name[len(prefix) + 1:].split(".")[0])
        per_block[index].append((name, layer_shape(module)))
    return per_block


def _distinct_inputs(block: list[tuple[str, LayerShape]]) -> list[int]:
    """Widths of the distinct tensors a block's targets read (siblings under one parent share one)."""
    keys = {}
    for name, shape in block:
        parent, _, child = name.rpartition(".")
        own = child.isdigit()  # one expert of a list: its own tokens
        keys[(name if own else parent, shape.in_features, bool(OUTPUT_LAYERS.search(child)))] = shape.in_features
    return list(keys.values())


def _activations_per_token(block: list[tuple[str, LayerShape]], hidden: int) -> int:
    """Numbers autograd keeps per token for one block: each distinct input, each SVD layer's two
    rank-sized intermediates and its output, and about four hidden-sized tensors (norms,
    attention, residual)."""
    return (sum(_distinct_inputs(block)) + sum(2 * _rank(s) + s.out_features for _, s in block)
            + 4 * hidden)


def _rank(shape: LayerShape) -> int:
    return min(shape.in_features, shape.out_features)


def plan_memory(model, *, batch_size: int = 4, seq_len: int = 256, dtype_bytes: int = 4,
                num_processes: int = 1, whitening_windows: int = 16, lora_rank: int | None = None,
                gradient_checkpointing: bool = True, on_gpu: bool = False, fsdp: bool = False,
                capacity_bytes: int | None = None) -> MemoryPlan:
    """Predicted peak bytes of each stage of compress on `model` (typically on the meta device).
    With `fsdp` the pass's weights and factors are split over the processes, plus one block
    gathered whole at a time, and the whitening keeps the decoder blocks in host memory, each
    process factorizing its share of them. Experts
    are counted as the pass sees them, one Linear per expert and matrix (`model` is unfused in place)."""
    unfuse_experts(model)
    b = dtype_bytes
    per_block = _targets_by_block(model)
    shapes = [shape for block in per_block for _, shape in block]
    all_params = sum(p.numel() for p in model.parameters())
    target_params = sum(s.dense_params for s in shapes)
    weights, other = all_params * b, (all_params - target_params) * b
    hidden = model.config.get_text_config().hidden_size
    vocab = model.get_output_embeddings().weight.shape[0]

    lora_rank = LORA_RANK if lora_rank is None else lora_rank

    def factor_bytes(shape: LayerShape) -> int:
        r = _rank(shape)
        lora = lora_rank * (shape.in_features + shape.out_features) * (2 * b + 8)  # weights, grads, Adam
        return r * (shape.in_features + shape.out_features) * b + lora + (shape.out_features * b if shape.bias else 0)

    factors = sum(factor_bytes(s) for s in shapes)
    values = sum(_rank(s) for s in shapes) * PER_VALUE_BYTES  # masks and scores: whole in every process
    block_factors = max(sum(factor_bytes(s) for _, s in block) for block in per_block)
    block_weights = max(sum(s.dense_params for _, s in block) for block in per_block) * b
    biggest = max(shapes, key=lambda s: s.in_features * s.out_features)

    # Whitening and SVD: at the last block every earlier block is factorized.
    covariances = max(sum(w * w * 4 for w in _distinct_inputs(block)) for block in per_block)
    widest = max(s.in_features for s in shapes)
    cholesky = 3 * widest * widest * 4  # damped copy, identity, factor
    svd = 4 * (SVD_WORKSPACE * biggest.in_features * biggest.out_features
               + _rank(biggest) * (biggest.in_features + biggest.out_features))
    block_inputs = whitening_windows * seq_len * hidden * b
    whitening_batch = min(batch_size, whitening_windows) * seq_len
    forward = whitening_batch * max(s.out_features for s in shapes) * 4 * b  # a block's transient activations
    own_factors = factors // num_processes + block_factors if fsdp else factors  # FSDP: its share of the blocks
    if not on_gpu:
        resident, whitening_host = weights + own_factors + values, 0
    elif fsdp:  # the blocks wait in host memory and visit the device one at a time
        resident, whitening_host = other + block_weights + block_factors, weights + own_factors + values
    else:
        resident, whitening_host = other + factors + values + biggest.dense_params * b, weights - other
    whitening = resident + block_inputs + covariances + max(cholesky + svd, forward)

    # The pass, per process.
    tokens = batch_size // num_processes * seq_len
    one_block = tokens * max(_activations_per_token(block, hidden) for block in per_block) * b
    activations = (len(per_block) * tokens * hidden * b + one_block if gradient_checkpointing
                   else len(per_block) * one_block)
    loss = tokens * vocab * (b + 8 + (4 if b < 4 else 0))  # logits, fp32 copy, log-softmax, its gradient
    compact = max(factor_bytes(s) for s in shapes)  # one layer re-stored when its values die
    if fsdp:
        trained = (other + factors + compact) // num_processes + block_factors + values
    else:
        trained = other + factors + compact + values
    # The dense base waits in host memory (on CPU without FSDP it shares what is not factorized).
    base = weights if on_gpu or fsdp else weights - other
    pass_device = trained + activations + loss + (0 if on_gpu else base)
    pass_host = base if on_gpu else pass_device

    # Materialization on the host: base, stored factors (cut at the dense cap), the built copy.
    stored = sum(min(_rank(s), math.ceil(s.in_features * s.out_features / (s.in_features + s.out_features)))
                 * (s.in_features + s.out_features) * b for s in shapes)
    materialize = 2 * weights + stored
    stages = [Stage("whitening + SVD", whitening, whitening_host or whitening),
              Stage("pass", pass_device, pass_host),
              Stage("materialize", materialize, materialize)]
    return MemoryPlan(stages, capacity_bytes)


def device_capacity(device: torch.device) -> int | None:
    """Memory one process may use on `device`: a GPU's total, or the machine's (or cgroup's) RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1] if torch.cuda.is_available() else None
    if device.type != "cpu":
        return None
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        return min(total, int(limit)) if limit.isdigit() else total
    except OSError:
        return total


def meta_model(source: str, trust_remote_code: bool = False, revision: str | None = None, token: str | None = None):
    """The model `source` names on the meta device: every shape from its config, no weights read."""
    return empty_model(load_config(source, trust_remote_code, revision, token), trust_remote_code)
