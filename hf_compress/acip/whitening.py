"""Input covariances for the whitened SVD, one decoder block at a time.

Holding every target's fp32 input covariance at once costs tens of GB on a 7B model. Instead,
as GPTQ and llm-compressor's sequential pipeline do, one forward of the whitening windows
records what each block is called with; then each block in turn runs on its inputs with hooks
that sum x^T x once per distinct input (q/k/v read one tensor, gate/up another), hands those
covariances to the caller, and passes its dense outputs on as the next block's inputs. Only one
block's covariances exist at a time, and each is freed as soon as the caller has used it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import HfCompressError
from ..layers import decoder_blocks, layer_shape


def _split_hidden(args: tuple, kwargs: dict):
    """A block call as (hidden states, the rest): hidden states come first or as a keyword."""
    if args:
        return args[0], args[1:], kwargs
    rest = dict(kwargs)
    return rest.pop("hidden_states"), (), rest


def block_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class _Recorded(Exception):
    """Raised at the last block: its call is recorded and nothing after it needs to run."""


@torch.no_grad()
def record_block_calls(model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor]):
    """First block's hidden states per batch, and every block's other arguments per batch (the
    attention masks and position embeddings can differ between blocks, e.g. sliding windows).
    The blocks do not run (each passes its input on), so they may wait on the CPU meanwhile."""
    first_hidden, calls = [], [[] for _ in blocks]

    def recorder(index):
        def record(module, args, kwargs):
            hidden, rest_args, rest_kwargs = _split_hidden(args, kwargs)
            calls[index].append((rest_args, rest_kwargs))
            if index == 0:
                first_hidden.append(hidden)
            if index == len(blocks) - 1:
                raise _Recorded
        return record

    def pass_on(hidden_states, *args, **kwargs):
        return hidden_states

    handles = [block.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, block in enumerate(blocks)]
    wrapped = [block.__dict__.get("forward") for block in blocks]  # Accelerate's hooks wrap forward this way
    for block in blocks:
        block.forward = pass_on
    try:
        for batch in batches:
            with contextlib.suppress(_Recorded):
                model(input_ids=batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        for block, forward in zip(blocks, wrapped):
            del block.forward
            if forward is not None:
                block.forward = forward
    return first_hidden, calls


class _SharedInputs:
    """Sums x^T x per distinct input tensor of a block's targets: layers that read the same
    tensor in a forward (q/k/v, gate/up) share one covariance."""

    def __init__(self, targets: dict[str, nn.Module]):
        self.groups: dict[str, list[str]] = {}  # first layer's name -> names sharing its input
        self.sums: dict[str, torch.Tensor] = {}
        self._seen: list[tuple[torch.Tensor, str]] = []  # this forward's inputs (held: ids stay unique)
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in targets.items()]

    def _hook(self, name):
        def accumulate(module, args):
            x = args[0]
            key = next((k for seen, k in self._seen if seen is x), None)
            if key is None:
                self._seen.append((x, name))
                flat = x.detach().reshape(-1, x.shape[-1]).float()
                self.sums[name] = self.sums.get(name, 0.0) + flat.t() @ flat
                key = name
            group = self.groups.setdefault(key, [])
            if name not in group:
                group.append(name)
        return accumulate

    def end_forward(self) -> None:
        self._seen.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def warn_if_few_tokens(targets: dict[str, nn.Module], tokens: int) -> None:
    """A covariance from fewer tokens than inputs is rank-deficient: damping then decides part of
    the basis, and the whitened SVD is less faithful than it looks."""
    name, widest = max(((n, layer_shape(m).in_features) for n, m in targets.items()), key=lambda item: item[1])
    if tokens < widest:
        warnings.warn(
            f"whitening sees {tokens} tokens, fewer than the {widest} inputs of {name}: its input "
            "covariance is rank-deficient and gets damped; raise --whitening-windows (or --seq-len)"
        )


@torch.no_grad()
def block_covariances(model: nn.Module, targets: dict[str, nn.Module], batches: list[torch.Tensor],
                      show_progress: bool = True, offload: bool = False) -> Iterator[tuple[list[str], torch.Tensor]]:
    """Yield (names of targets sharing one input, that input's fp32 covariance), block by block.

    A block's outputs are computed with its original layers before the caller sees its
    covariances, so the caller may replace those layers as soon as they are yielded. Targets no
    batch reached (an expert no token was routed to) are not yielded. With `offload`, the blocks
    wait on the CPU and each visits the batches' device only while it is processed (for models
    that do not fit one device)."""
    prefix, blocks = decoder_blocks(model)
    warn_if_few_tokens(targets, sum(batch.numel() for batch in batches))
    hidden, calls = record_block_calls(model, blocks, batches)
    for index, block in enumerate(tqdm(blocks, desc="input covariances, block by block", leave=False,
                                       disable=not show_progress)):
        inside = {n: m for n, m in targets.items() if n.startswith(f"{prefix}.{index}.")}
        if offload:
            block.to(batches[0].device)
        sums = _SharedInputs(inside)
        try:
            for b, (args, kwargs) in enumerate(calls[index]):
                hidden[b] = block_output(block(hidden[b], *args, **kwargs))
                sums.end_forward()
        finally:
            sums.remove()
        calls[index] = None  # this block's masks and position embeddings are no longer needed
        for key in list(sums.sums):
            yield sums.groups[key], sums.sums.pop(key)
        if offload:
            block.to("cpu")


def cholesky(covariance: torch.Tensor) -> torch.Tensor:
    """Cholesky with just enough damping to be positive definite (inputs can be rank-deficient)."""
    eye = torch.eye(len(covariance), device=covariance.device)
    scale = covariance.diagonal().mean().clamp_min(1e-12)
    for damping in (1e-6, 1e-4, 1e-2, 1e-1):
        factor, info = torch.linalg.cholesky_ex(covariance + damping * scale * eye)
        if info == 0:
            return factor
    raise HfCompressError("input covariance is not positive definite even after damping")
