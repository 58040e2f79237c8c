"""One ranking across blocks: how many units each block keeps for a whole-model size.

What a block can lose differs by an order of magnitude between blocks of one model, and which
blocks are fragile differs between model families, so no fixed schedule holds up. Here every
site (a block's MLP, or its attention) is shrunk alone on a copy at ratios down a grid, and the
error it causes at the block's output, relative to that output (the residual stream: what
every later block reads), is its cost. Greedy marginal allocation then takes the step with the
least added squared error per parameter saved, across all blocks, until the targeted units are
`ratio` of their size: the cheapest units go first, wherever they are, as ACIP's global ranking
does for singular values.

The probe inputs are the decoder blocks' own inputs on a few token windows: random token ids
(data-free: nothing but the weights is used; the errors they show rank blocks much as real
text does, docs/BENCHMARKS.md) or calibration windows when the method has data.
"""

from __future__ import annotations

import copy
import heapq

import torch
from torch import nn
from tqdm.auto import tqdm

from ..layers import decoder_blocks
from ..offload import input_device, resident
from ..quantize import width_multiple
from .config import ShrinkConfig
from .rewrite import check_head_counts, kept_units, shrink_site
from .selection import Selection
from .sites import Site

GRID = (0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)  # ratios a site steps down
PROBE_WINDOWS, PROBE_LENGTH = 8, 128


def random_windows(model, tokenizer=None, windows: int = PROBE_WINDOWS, length: int = PROBE_LENGTH,
                   seed: int = 0) -> torch.Tensor:
    """Token windows of uniformly random ids (each opening with BOS if the model has one): a
    data-free probe of what every block does."""
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (windows, length), generator=torch.Generator().manual_seed(seed))
    bos = getattr(model.config.get_text_config(), "bos_token_id", None) if tokenizer is None else tokenizer.bos_token_id
    if isinstance(bos, int) and bos < vocab:
        ids[:, 0] = bos
    return ids


@torch.no_grad()
def block_inputs(model, windows: torch.Tensor) -> dict[int, tuple[tuple, dict]]:
    """Each decoder block's forward arguments on `windows` (one forward of the whole model)."""
    _, blocks = decoder_blocks(model)
    captured = {}

    def capture(index):
        def hook(module, args, kwargs):
            captured[index] = (args, kwargs)
        return hook

    hooks = [block.register_forward_pre_hook(capture(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        model(windows.to(input_device(model)), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class SiteCost:
    """The relative output error of one block when one of its sites keeps k of its units."""

    def __init__(self, block: nn.Module, index: int, site: Site, inputs: tuple[tuple, dict], selection: Selection,
                 multiple: int):
        self.block, self.index, self.site, self.inputs = block, index, site, inputs
        self.selection, self.multiple = selection, multiple
        self.units = site.reads[0].units
        self.steps = sorted({kept_units(r, self.units, multiple) for r in GRID} - {self.units}, reverse=True)
        with resident(block):
            self.reference = self._output(block)
        self.cache: dict[int, float] = {self.units: 0.0}

    def _output(self, block) -> torch.Tensor:
        args, kwargs = self.inputs
        return _hidden(block(*args, **kwargs))[:, 1:].float()  # position 0 (BOS, the attention sink) apart

    @torch.no_grad()
    def __call__(self, k: int) -> float:
        """Squared error relative to the block's output, this site alone shrunk to k units."""
        if k not in self.cache:
            with resident(self.block):  # a block Accelerate offloaded is read back for each trial
                trial = copy.deepcopy(self.block)
            shrink_site(trial, self.index, self.site, k / self.units, self.selection, self.multiple)
            error = (self._output(trial) - self.reference).pow(2).sum() / self.reference.pow(2).sum()
            self.cache[k] = float(error)
        return self.cache[k]


def allocate(model, found: list[tuple[int, Site]], ratio: float, selection: Selection,
             inputs: dict[int, tuple[tuple, dict]], multiple: int = 1, show_progress: bool = True) -> dict[int, float]:
    """Block -> ratio for the sites `found` (one kind: all MLPs or all attentions), so that their
    units together are `ratio` of their number at the least summed relative squared error;
    `inputs` are `block_inputs` on the probe windows."""
    _, blocks = decoder_blocks(model)
    costs = {index: SiteCost(blocks[index], index, site, inputs[index], selection, multiple) for index, site in found}
    kept = {index: cost.units for index, cost in costs.items()}
    budget = sum(kept.values()) - round(ratio * sum(kept.values()))  # units to remove
    bar = tqdm(total=budget, desc="allocating", disable=not show_progress, leave=False)

    def candidate(index):
        """(added error per unit removed, block, units then kept) for this block's next step."""
        lower = [k for k in costs[index].steps if k < kept[index]]
        if not lower:
            return None
        return ((costs[index](lower[0]) - costs[index](kept[index])) / (kept[index] - lower[0]), index, lower[0])

    heap = [c for c in map(candidate, costs) if c is not None]
    heapq.heapify(heap)
    removed = 0
    while heap and removed < budget:
        _, index, k = heapq.heappop(heap)
        k = max(k, kept[index] - (budget - removed) // multiple * multiple)  # the last step: only as far as needed
        if k == kept[index]:
            break
        removed += kept[index] - k
        bar.update(kept[index] - k)
        kept[index] = k
        if (next_candidate := candidate(index)) is not None:
            heapq.heappush(heap, next_candidate)
    bar.close()
    return {index: k / costs[index].units for index, k in kept.items()}


def allocated(model, config: ShrinkConfig, selection: Selection, found: list[tuple[int, float, Site]],
              windows: torch.Tensor, show_progress: bool = True) -> list[tuple[int, float, Site]]:
    """The sites `found` (`sites.sites`) with each block's ratio allocated on the probe `windows`
    when `config.layers` is "global" (MLPs to make up `ratio` together, attentions `heads_ratio`)."""
    if config.layers != "global":
        return found
    check_head_counts(decoder_blocks(model)[1], config, uniform=False)
    inputs = block_inputs(model, windows)  # one forward serves both kinds
    planned = []
    for kind, ratio, multiple in (("mlp", config.ratio, width_multiple(config.quantize)),
                                  ("attention", config.heads_ratio, 1)):
        group = [(index, site) for index, _, site in found if site.kind == kind]
        ratios = allocate(model, group, ratio, selection, inputs, multiple, show_progress) if group and ratio < 1 else {}
        planned += [(index, ratios.get(index, 1.0), site) for index, site in group]
    return sorted(planned, key=lambda entry: entry[0])
