"""Exponential torque pruning (arXiv 2506.22015): a short training of the model's weights on
calibration text while a force pulls every unit (MLP channel, KV head group) toward zero. Units
are ordered by their activation importance; the most important one is the pivot and the force
grows exponentially with the distance from it (the reference's alpha^i with alpha = 1.01^(500/n),
so the farthest unit feels 1.01^500, about 145x, the pivot's), so the least important units die
while the rest of the network learns to do without them.

The force is applied as the proximal step of a group norm on each unit's weights (its rows in
gate/up or q/k/v, its columns in down or o): a unit shrinks as a whole and reaches exactly zero,
where the reference's elementwise L1 would zero single weights of the units that stay. Its scale
is set by the target: over the run, the first unit to be pruned (rank k, k the units kept) is
pulled by `strength` times its own norm, those beyond it exponentially harder. A run serves its
ratio only: the units it kills are gone, and the rest have learned to do without them.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from ..errors import HfCompressError
from ..io import atomic_save, read_state
from ..layers import decoder_blocks
from ..quantize import width_multiple
from ..training import checkpointed_blocks, cycle_batches, fsdp_requested, shuffled
from .config import PruneConfig
from .rewrite import kept_units
from .selection import Scored, activation_scores
from .sites import Segment, Site

GROWTH = 1.01 ** 500  # the force on the farthest unit over the pivot's
PROGRESS_FILE = "torque.pt"


class Torque(Scored):
    """Keep the units that survived the torque run (`torque_scores`); with `progress_dir` the run
    is resumable there."""

    def __init__(self, config: PruneConfig, progress_dir: str | Path | None = None):
        super().__init__(config)
        self.progress_dir = progress_dir

    def prepare(self, model, data, found, show_progress=True):
        def importance():
            return activation_scores(model, data, found, self.config.batch_size, show_progress)

        self.table = torque_scores(model, data, found, self.config, importance, self.progress_dir, show_progress)
        return {"steps": self.config.max_steps}


@dataclass
class _Piece:
    """One segment of a unit group as a (units, per_unit, rest) view of its layer's weight."""

    weight: nn.Parameter
    axis: int  # the weight's dimension the units own
    seg: Segment

    def view(self) -> torch.Tensor:
        rows = slice(self.seg.start, self.seg.start + self.seg.units * self.seg.per_unit)
        return self.weight.data.movedim(self.axis, 0)[rows].unflatten(0, (self.seg.units, self.seg.per_unit))


def _pieces(block: nn.Module, segments: tuple[Segment, ...], reads: bool) -> list[_Piece]:
    """Reads own rows of the (out x in) weight, writes its columns; Conv1D stores in x out."""
    pieces = []
    for seg in segments:
        module = block.get_submodule(seg.module)
        axis = int(reads) if isinstance(module, Conv1D) else int(not reads)
        pieces.append(_Piece(module.weight, axis, seg))
    return pieces


class UnitGroup:
    """The units of one site under torque: their weights, rank from the pivot, and deaths."""

    def __init__(self, block: nn.Module, site: Site, kept: int, rank: torch.Tensor, boundary: float,
                 death: torch.Tensor):
        self.pieces = _pieces(block, site.reads, True) + _pieces(block, site.writes, False)
        self.kept, self.rank, self.boundary, self.death = kept, rank, boundary, death

    @classmethod
    def start(cls, block: nn.Module, site: Site, kept: int, importance: torch.Tensor) -> "UnitGroup":
        """A fresh group: the most important unit is the pivot (rank 0), none has died."""
        order = importance.argsort(descending=True)
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=order.device))
        group = cls(block, site, kept, rank, 0.0, torch.full((len(order),), -1, dtype=torch.long))
        group.boundary = float(group.norms()[order[kept]]) if kept < len(order) else 0.0  # the first pruned unit's
        return group

    @torch.no_grad()
    def norms(self) -> torch.Tensor:
        return sum(p.view().float().pow(2).sum((1, 2)) for p in self.pieces).sqrt()

    def weights(self) -> list[nn.Parameter]:
        return [p.weight for p in self.pieces]

    @torch.no_grad()
    def pull(self, strength: float, step: int) -> None:
        """The proximal step of the units' group norms: each unit's weights shrink by strength x
        boundary x GROWTH^((rank - kept) / n) of norm, to zero at most (dead for good)."""
        norms = self.norms()
        n = len(norms)
        force = strength * self.boundary * GROWTH ** ((self.rank.to(norms.device) - self.kept) / n)
        factor = (1 - force / norms.clamp_min(1e-30)).clamp_min(0) * (self.death.to(norms.device) < 0)
        self.death[(factor.cpu() == 0) & (self.death < 0)] = step
        for piece in self.pieces:
            view = piece.view()
            view.mul_(factor.to(view.dtype)[:, None, None])

    def scores(self, steps: int) -> torch.Tensor:
        """Higher survives: alive units by their rank from the pivot (a weak pull leaves the
        activation order), dead ones below them by how late they died."""
        rank = self.rank.cpu().float()
        return torch.where(self.death < 0, 2 - rank / len(rank), (self.death - steps - 1) / (steps + 1))

    def state(self) -> dict:
        return {"rank": self.rank.cpu(), "boundary": self.boundary, "death": self.death}


def _settings(config: PruneConfig, data: torch.Tensor, found: list[tuple[int, float, Site]], kept: list[int]) -> dict:
    """Everything a training depends on: a saved state with other settings is not resumed."""
    digest = hashlib.sha1(data.cpu().numpy().tobytes()).hexdigest()
    sites = [[index, site.kind, units] for (index, _, site), units in zip(found, kept)]
    return {"sites": sites, "data": [list(data.shape), digest],
            **{name: getattr(config, name) for name in ("max_steps", "lr", "strength", "batch_size", "seed")}}


def torque_scores(model: nn.Module, data: torch.Tensor, found: list[tuple[int, float, Site]], config: PruneConfig,
                  importance: Callable[[], dict[tuple[int, Site], torch.Tensor]],
                  progress_dir: str | Path | None = None,
                  show_progress: bool = True) -> dict[tuple[int, str], torch.Tensor]:
    """Train `model` in place under torque on `data` (n x seq_len) toward the ratios of `found`
    and return (block, site) -> each unit's score; `importance()` ranks the units of a fresh
    run. Runs where Accelerate puts it (CPU, one GPU, DDP); with `progress_dir` it writes a
    resumable state every `config.save_every` steps and at the end, and a rerun with the same
    settings resumes it (finished: reads it back) without ranking the units again."""
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(split_batches=True))
    if fsdp_requested(accelerator):
        raise HfCompressError("prune --method torque trains every weight it prunes on each process: it runs on one "
                              "device or under DDP, not FSDP")
    if config.batch_size % accelerator.num_processes:
        raise HfCompressError(f"batch size {config.batch_size} must be a multiple of the "
                              f"{accelerator.num_processes} processes")
    if len(data) < config.batch_size:
        raise HfCompressError(f"too little calibration data: {len(data)} windows, fewer than one batch of "
                              f"{config.batch_size}")
    if config.max_steps * config.batch_size > len(data):
        warnings.warn(f"{config.max_steps} steps x {config.batch_size} windows exceed the {len(data)} calibration "
                      "windows; the data will be cycled")
    torch.manual_seed(config.seed)
    model.to(accelerator.device).eval()  # eval: no dropout, so every process computes the same
    _, blocks = decoder_blocks(model)
    multiple = width_multiple(config.quantize)
    kept = [kept_units(ratio, site.reads[0].units, 1 if site.kind == "attention" else multiple)
            for _, ratio, site in found]
    settings = _settings(config, data, found, kept)
    progress = Path(progress_dir) / PROGRESS_FILE if progress_dir else None
    saved = _read(progress, settings) if progress is not None and progress.is_file() else None
    if saved is None:
        table = importance()
        groups = [UnitGroup.start(blocks[index], site, k, table[index, site].to(accelerator.device))
                  for (index, _, site), k in zip(found, kept)]
    else:
        groups = [UnitGroup(blocks[index], site, k, **state)
                  for (index, _, site), k, state in zip(found, kept, saved["groups"])]
    weights = list({id(w): w for g in groups for w in g.weights()}.values())
    model.requires_grad_(False)
    for weight in weights:
        weight.requires_grad_(True)
    optimizer = torch.optim.AdamW(weights, lr=config.lr, weight_decay=0.0)
    state = {"step": 0, "history": []}
    if saved is not None:
        state = _resume(saved, weights, optimizer, accelerator, progress)
    wrapped = accelerator.prepare(model)
    loader = accelerator.prepare(DataLoader(TensorDataset(shuffled(data, config.seed)), batch_size=config.batch_size,
                                            drop_last=True))
    bar = tqdm(total=config.max_steps, initial=state["step"], desc="torque",
               disable=not (show_progress and accelerator.is_main_process))
    with checkpointed_blocks(model, config.gradient_checkpointing):
        for (batch,) in cycle_batches(accelerator, loader, state["step"]):
            if state["step"] >= config.max_steps:
                break
            loss = wrapped(input_ids=batch, labels=batch, use_cache=False).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            for group in groups:
                group.pull(config.strength / config.max_steps, state["step"])
            dead = sum(int((g.death >= 0).sum()) for g in groups)
            loss_value = accelerator.reduce(loss.detach(), "mean").item()
            state["history"].append({"step": state["step"], "loss": round(loss_value, 4), "dead": dead})
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", dead=dead)
            if progress is not None and (state["step"] % config.save_every == 0 or state["step"] == config.max_steps):
                _save(accelerator, progress, settings, weights, optimizer, groups, state)
    bar.close()
    model.requires_grad_(False)
    accelerator.wait_for_everyone()
    return {(index, site): group.scores(config.max_steps) for (index, _, site), group in zip(found, groups)}


def _save(accelerator, path: Path, settings, weights, optimizer, groups, state) -> None:
    if accelerator.is_main_process:
        atomic_save({"settings": settings, "state": state, "weights": [w.detach().cpu() for w in weights],
                     "optimizer": optimizer.state_dict(), "groups": [g.state() for g in groups]}, path)
    accelerator.wait_for_everyone()


def _read(path: Path, settings: dict) -> dict:
    payload = read_state(path)
    if payload["settings"] != settings:
        raise HfCompressError(f"{path.parent} holds a torque run with other settings or data (ratio, steps, lr, "
                              "strength, batch, seed); pass --overwrite to start afresh")
    return payload


@torch.no_grad()
def _resume(payload: dict, weights, optimizer, accelerator, path: Path) -> dict:
    for weight, saved in zip(weights, payload["weights"]):
        weight.copy_(saved)
    optimizer.load_state_dict(payload["optimizer"])
    if accelerator.is_main_process:
        print(f"resuming the torque run at step {payload['state']['step']} from {path}")
    return payload["state"]
