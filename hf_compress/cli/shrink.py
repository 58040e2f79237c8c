"""`fold` and `prune`: smaller models of the same architecture."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer

from ..errors import HfCompressError
from .app import app, check_output_dir, config_from, console, load, on_disk, progress_dir, quantized_note
from .options import (BatchSize, Dataset, DatasetConfig, DatasetRevision, DatasetSplit, Device, DeviceMap, Dtype,
                      ExpertsRatio,
                      GradientCheckpointing, HeadsRatio, Layers, MaxMemory, MaxShardSize, MaxSteps, Model, Output,
                      Overwrite, Quantize, QuantizeHead, Ratio, Revision, SaveEvery, Seed, SeqLen, TextColumn, Token,
                      TrustRemoteCode, Windows)


@app.command("fold")
def fold_command(
    model: Model,
    ratio: Ratio,
    output: Output,
    heads_ratio: HeadsRatio = 1.0,
    experts_ratio: ExpertsRatio = 1.0,
    layers: Layers = "global",
    seed: Seed = 0,
    iterations: Annotated[int, typer.Option(help="k-means iterations per site.")] = 20,
    quantize: Quantize = None,
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
    """Fold a model data-free into a smaller one of the same architecture."""
    from ..checkpoint import save_checkpoint
    from ..loading import parse_size
    from ..shrink import FoldConfig, fold

    config = config_from(FoldConfig, locals(), layers=parse_layers(layers, ratio))
    check_output_dir(output, overwrite)
    net, tokenizer = load(model, device, dtype, trust_remote_code, revision, token, device_map, max_memory)
    start = time.perf_counter()
    net = fold(net, config)
    seconds = time.perf_counter() - start
    save_checkpoint(net, tokenizer, output, overwrite=overwrite, max_shard_size=parse_size(max_shard_size))
    print_shrunk(net, output, f"folded in {seconds:.1f} s")


@app.command("prune")
def prune_command(
    model: Model,
    ratio: Ratio,
    output: Output,
    method: Annotated[str, typer.Option(
        help="'activation' (weights x activation norms on calibration text, Wanda-sp / FLAP), 'torque' (train the "
             "weights while exponential torque pulls the least important units to zero) or 'magnitude' (weights "
             "only, no data).")] = "activation",
    heads_ratio: HeadsRatio = 1.0,
    experts_ratio: ExpertsRatio = 1.0,
    layers: Layers = "all",
    dataset: Dataset = "builtin",
    dataset_config: DatasetConfig = None,
    dataset_split: DatasetSplit = "train",
    text_column: TextColumn = "text",
    dataset_revision: DatasetRevision = None,
    seq_len: SeqLen = 256,
    windows: Windows = None,
    batch_size: BatchSize = 4,
    max_steps: MaxSteps = 100,
    lr: Annotated[float, typer.Option(help="torque: AdamW learning rate of the weights.")] = 1e-5,
    strength: Annotated[float, typer.Option(
        help="torque: the pull on the first unit to be pruned over the run, in its own norms (those beyond it "
             "are pulled exponentially harder).")] = 0.25,
    save_every: SaveEvery = 10,
    gradient_checkpointing: GradientCheckpointing = True,
    seed: Seed = 0,
    quantize: Quantize = None,
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
    """Prune whole MLP channels and key/value head groups into a smaller model of the same architecture."""
    from ..training import clear_progress
    from ..checkpoint import save_checkpoint
    from ..data import TextSource, calibration_data
    from ..loading import parse_size, process_state
    from ..shrink import PruneConfig, prune

    config = config_from(PruneConfig, locals(), layers=parse_layers(layers, ratio))
    check_output_dir(output, overwrite)
    if method == "torque" and (device_map or max_memory):
        raise HfCompressError("prune --method torque trains the model, on one device or under accelerate launch; "
                              "--device-map and --max-memory apply to the other methods")
    if device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"  # torque trains where Accelerate puts it
    progress = progress_dir(output)  # torque's resumable state, removed when done
    if overwrite:
        clear_progress(progress)
    net, tokenizer = load(model, device, dtype, trust_remote_code, revision, token, device_map, max_memory)
    windows = windows or (max_steps * batch_size if method == "torque" else 64)
    text = config_from(TextSource, locals())
    data = calibration_data(tokenizer, text, seq_len=seq_len, max_windows=windows) if config.needs_data else None
    start = time.perf_counter()
    net = prune(net, data, config, dataset=dataset, progress_dir=progress)
    seconds = time.perf_counter() - start
    if process_state().is_main_process:
        save_checkpoint(net, tokenizer, output, overwrite=overwrite, max_shard_size=parse_size(max_shard_size))
        clear_progress(progress)
        print_shrunk(net, output, f"pruned in {seconds:.1f} s")


def print_shrunk(net, output: Path, timing: str) -> None:
    info = net.config.hf_compress
    kind = "per-layer sizes (self-contained, trust_remote_code)" if info["shapes"] else "same architecture, no remote code"
    console.print(f"[green]wrote[/green] {output}: size ratio {info['size_ratio']:.4f}, {on_disk(output)}"
                  f"{quantized_note(net)}, {kind}, {timing}", highlight=False)


def parse_layers(text: str, ratio: float) -> str | dict[int, float]:
    """'global', 'middle', 'all', or '0-3,7' / '2-9=0.95,10-27=0.8' (blocks without a ratio take --ratio)."""
    from ..shrink.config import SCHEDULES

    if text.strip() in SCHEDULES:
        return text.strip()
    plan = {}
    try:
        for part in text.split(","):
            blocks, _, block_ratio = part.partition("=")
            low, _, high = blocks.partition("-")
            plan |= dict.fromkeys(range(int(low), int(high or low) + 1), float(block_ratio) if block_ratio else ratio)
    except ValueError:
        raise HfCompressError(
            f"--layers takes 'global', 'middle', 'all' or blocks and ranges like '0-3,7' or '2-9=0.95,10-27=0.8', got '{text}'"
        ) from None
    return plan
