"""`materialize` (a size from a compressible directory) and `quantize`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import HfCompressError
from .app import (app, check_output_dir, check_quantize, check_ratio, config_from, console, load, load_compressible,
                  on_disk, quantized_note, ratio_within_loss)
from .options import (MODEL_HELP, Compensate, Dataset, DatasetConfig, DatasetRevision, DatasetSplit, Device, DeviceMap,
                      Dtype, MaxMemory, MaxShardSize,
                      MaxLossIncrease, Output, Overwrite, Quantize, QuantizeHead, Revision, SeqLen, SizeRatio,
                      SpeedAware, Structure, TextColumn, Token, TrustRemoteCode, Windows)


@app.command()
def materialize(
    path: Annotated[Path, typer.Argument(help="Compressible directory written by `compress`.")],
    output: Output,
    size_ratio: SizeRatio = None,
    max_size: Annotated[Optional[str], typer.Option(help="Instead of a ratio: the largest model whose weight files "
                                                         "(safetensors, headers included) fit on disk, e.g. 60MB; "
                                                         "config and tokenizer files are counted apart.")] = None,
    max_loss_increase: MaxLossIncrease = None,
    dataset: Dataset = "builtin",
    dataset_config: DatasetConfig = None,
    dataset_split: DatasetSplit = "train",
    text_column: TextColumn = "text",
    dataset_revision: DatasetRevision = None,
    token: Token = None,
    seq_len: SeqLen = 256,
    windows: Windows = 8,
    quantize: Quantize = None,
    quantize_head: QuantizeHead = False,
    speed_aware: SpeedAware = False,
    structure: Structure = "mixed",
    compensate: Compensate = None,
    device: Device = None,
    dtype: Dtype = None,
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    max_shard_size: MaxShardSize = "50GB",
    overwrite: Overwrite = False,
    trust_remote_code: TrustRemoteCode = False,
):
    """Write a checkpoint of a size, byte budget or loss budget that AutoModelForCausalLM loads."""
    from ..checkpoint import save_checkpoint
    from ..data import TextSource
    from ..loading import parse_size

    if sum(x is not None for x in (size_ratio, max_size, max_loss_increase)) != 1:
        raise HfCompressError("give exactly one of --size-ratio, --max-size and --max-loss-increase")
    if size_ratio is not None:
        check_ratio(size_ratio)
    max_bytes = None if max_size is None else parse_size(max_size)
    shard_bytes = parse_size(max_shard_size)
    check_quantize(quantize)
    check_output_dir(output, overwrite)
    compressible = load_compressible(path, device, dtype, trust_remote_code, device_map, max_memory)
    search = None
    if max_loss_increase is not None:
        size_ratio, search = ratio_within_loss(compressible, max_loss_increase, config_from(TextSource, locals()),
                                               seq_len, windows, quantize, structure=structure, compensate=compensate)
    model = compressible.materialize(size_ratio, max_bytes=max_bytes, quantize=quantize, quantize_head=quantize_head,
                                     speed_aware=speed_aware, structure=structure, compensate=compensate,
                                     shard_bytes=shard_bytes)
    if search is not None:
        model.config.hf_compress["loss_budget"] = search
    save_checkpoint(model, compressible.tokenizer, output, overwrite=overwrite, max_shard_size=shard_bytes)
    info = model.config.hf_compress
    budget = f" (the largest within {max_size})" if max_size else ""
    if search is not None:
        budget = f" (the smallest within {max_loss_increase:.1%} of the dense loss on {search['dataset']})"
    if speed_aware:
        budget += (f"; speed-aware: a second matmul call costs as much as reading "
                   f"{info['speed_overhead_params']:,} weights here")
    console.print(
        f"[green]wrote[/green] {output}: size ratio {info['size_ratio']:.4f}{budget}, {on_disk(output)}"
        f"{quantized_note(model)} ({info['target_params']:,} of {info['target_dense_params']:,} targeted "
        f"parameters, {len(info['ranks'])} layers factorized) in {model.materialize_seconds:.2f} s", highlight=False)


@app.command("quantize")
def quantize_command(
    model: Annotated[str, typer.Argument(help=MODEL_HELP + " Folded and materialized checkpoints too.")],
    output: Output,
    method: Annotated[str, typer.Option(help="nf4, fp4 or int8.")] = "nf4",
    quantize_head: QuantizeHead = False,
    device: Device = None,
    dtype: Dtype = None,
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    max_shard_size: MaxShardSize = "50GB",
    overwrite: Overwrite = False,
    revision: Revision = None,
    token: Token = None,
    trust_remote_code: TrustRemoteCode = False,
):
    """Quantize a model with bitsandbytes; the checkpoint reloads with plain transformers."""
    from ..checkpoint import save_checkpoint
    from ..loading import parse_size
    from ..quantize import quantize

    check_quantize(method)
    check_output_dir(output, overwrite)
    net, tokenizer = load(model, device, dtype, trust_remote_code, revision, token, device_map, max_memory)
    quantized = quantize(net, method, quantize_head)
    save_checkpoint(quantized, tokenizer, output, overwrite=overwrite, max_shard_size=parse_size(max_shard_size))
    console.print(f"[green]wrote[/green] {output}: {on_disk(output)}{quantized_note(quantized)}",
                  highlight=False)
