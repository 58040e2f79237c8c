"""When a factorized layer is faster than the dense one, measured on the device it will run on.

Decoding one token reads every weight once, so a layer's time is about a fixed cost per matmul
call plus its bytes over the memory bandwidth. A factorized layer makes two calls where the dense
one makes one: it is faster only if the weights it saves take longer to read than one call's fixed
cost. `call_overhead_params` expresses that cost as weights (fixed seconds x bandwidth / bytes per
weight), so `LayerShape.is_dense_at(rank, overhead)` can compare rank x (in + out) + overhead with
in x out. On a CPU it is tens of thousands of weights; on a GPU, where a call's launch costs as
much as reading millions of weights, it is millions, and small layers stay dense.
"""

from __future__ import annotations

import functools
import statistics
import time

import torch
import torch.nn.functional as F

from .modeling_hf_compress import FactorizedLinear

_BANDWIDTH_BYTES = 256 * 2**20  # weights read per bandwidth sample: more than any cache


def _seconds(fn, device: torch.device, repeats: int = 5) -> float:
    """Median wall time of `fn()` over `repeats` runs, after one warm-up."""
    def timed():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    timed()
    return statistics.median(timed() for _ in range(repeats))


@torch.no_grad()
def _extra_call_seconds(device: torch.device, dtype: torch.dtype, calls: int = 500) -> float:
    """What a tiny FactorizedLinear costs over a tiny Linear per call: the fixed cost of the second
    matmul and module call, with nothing to read."""
    dense = torch.nn.Linear(64, 64, bias=False).to(device, dtype)
    factorized = FactorizedLinear(64, 64, 8, bias=False).to(device, dtype)
    x = torch.ones(1, 1, 64, device=device, dtype=dtype)

    def repeat(layer):
        return lambda: [layer(x) for _ in range(calls)]

    return max(_seconds(repeat(factorized), device) - _seconds(repeat(dense), device), 0.0) / calls


@torch.no_grad()
def _bandwidth(device: torch.device, dtype: torch.dtype, width: int = 4096) -> float:
    """Bytes per second a batch-1 matmul reads weights at, from a pool larger than any cache."""
    count = max(1, _BANDWIDTH_BYTES // (width * width * dtype.itemsize))
    weights = [torch.full((width, width), 0.01, device=device, dtype=dtype) for _ in range(count)]
    x = torch.ones(1, width, device=device, dtype=dtype)
    seconds = _seconds(lambda: [F.linear(x, w) for w in weights], device)
    return count * width * width * dtype.itemsize / seconds


def call_overhead_params(device: torch.device | str, dtype: torch.dtype) -> int:
    """The time of one extra matmul call on `device`, as the number of `dtype` weights that could
    be read in it (measured once per process and device; about a second)."""
    return _measured(torch.device(device), dtype)


@functools.cache
def _measured(device: torch.device, dtype: torch.dtype) -> int:
    return round(_extra_call_seconds(device, dtype) * _bandwidth(device, dtype) / dtype.itemsize)
