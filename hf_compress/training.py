"""The training plumbing that the ACIP pass and torque pruning share: data order, batches that
resume mid-epoch, checkpointed blocks, Accelerate's launch checks, a module tree for DDP or FSDP to
wrap, stage timing, and removing resumable state."""

from __future__ import annotations

import contextlib
import copy
import functools
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import parse_flag_from_env
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import HfCompressError
from .layers import decoder_blocks


def shuffled(data: torch.Tensor, seed: int) -> torch.Tensor:
    """The pass's fixed data order (whitening uses its first windows)."""
    return data[torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))]

def fsdp_requested(state) -> bool:
    """Whether Accelerate (its `Accelerator` or `PartialState`) was asked for FSDP: `accelerate
    launch --use_fsdp` or `accelerate config`. Accelerate itself shards on GPUs only; the pass
    shards on any device, CPU processes included."""
    return state.num_processes > 1 and (state.distributed_type == DistributedType.FSDP
                                        or parse_flag_from_env("ACCELERATE_USE_FSDP"))


def check_launch(accelerator: Accelerator) -> None:
    """`accelerate launch` without a GPU (e.g. with --use_fsdp) starts processes that each believe
    they are alone and would each write the output."""
    launched = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if launched != accelerator.num_processes:
        raise HfCompressError(
            f"{launched} processes were launched but Accelerate sees {accelerator.num_processes}; without a GPU, "
            f"launch with ACCELERATE_USE_CPU=1 torchrun --nproc_per_node {launched} (add ACCELERATE_USE_FSDP=true for FSDP)"
        )


def training_copy(model: nn.Module) -> nn.Module:
    """A second module tree over the same tensors (new Parameter objects on the same storage), for
    DDP or FSDP to wrap and reshape while `model` itself stays untouched."""
    memo = {id(p): nn.Parameter(p.data, requires_grad=p.requires_grad) for p in model.parameters()}
    memo |= {id(b): b.detach() for b in model.buffers()}
    return copy.deepcopy(model, memo)

class StageMeter:
    """Seconds of each stage of the pass and, on a GPU, its peak allocated bytes: what the memory
    plan predicts, measured."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.started_at, self._last, self.stages = time.time(), time.perf_counter(), {}
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.stages[name] = {"seconds": round(now - self._last, 3)}
        if self.cuda:
            self.stages[name]["peak_bytes"] = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        self._last = now

    def report(self) -> dict:
        return {"started_at": self.started_at, **self.stages}

@contextlib.contextmanager
def checkpointed_blocks(model: nn.Module, enabled: bool = True):
    """Recompute each decoder block's activations during backward, so the pass holds one block's
    activations instead of all of them. Done here, not with transformers' switch, because that one
    acts only in training mode and the pass runs in eval mode (no dropout)."""
    blocks = decoder_blocks(model)[1] if enabled else []
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def cycle_batches(accelerator, loader, start_step: int):
    """Batches forever, starting where step `start_step` left off (cycling with a fixed order)."""
    skip = start_step % len(loader)
    while True:
        yield from (accelerator.skip_first_batches(loader, skip) if skip else loader)
        skip = 0

def clear_progress(progress_dir: str | Path) -> None:
    shutil.rmtree(progress_dir, ignore_errors=True)
