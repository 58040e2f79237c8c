"""`compress` (the ACIP pass) and `plan` (its memory, from the config alone)."""

from __future__ import annotations

import os
import time
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..errors import HfCompressError
from .app import app, check_output_dir, check_ratio, config_from, console, progress_dir
from .options import (MODEL_HELP, BatchSize, Dataset, DatasetConfig, DatasetRevision, DatasetSplit, Device, DryRun,
                      Dtype, GradientCheckpointing, LoraRank, MaxSteps, Model, Output, Overwrite, Revision, SaveEvery,
                      Seed, SeqLen, TextColumn, Token, TrustRemoteCode, WhiteningWindows)


@app.command()
def compress(
    model: Model,
    output: Output,
    dataset: Dataset = "builtin",
    dataset_config: DatasetConfig = None,
    dataset_split: DatasetSplit = "train",
    text_column: TextColumn = "text",
    dataset_revision: DatasetRevision = None,
    stop_ratio: Annotated[float, typer.Option(help="Stop once the targeted layers are this fraction of their "
                                                   "size.")] = 0.4,
    objective: Annotated[str, typer.Option(
        help="What moves the masks: saliency. Experimental, each behind saliency at every budget measured "
             "(docs/BENCHMARKS.md): acip (the paper's), torque, drr, nuclear, pmmp.")] = "saliency",
    units: Annotated[Optional[str], typer.Option(
        help="What the pass ranks: 'values' (singular values), 'channels' (and MLP channels), 'all' (and key/value "
             "head groups, where the architecture allows); default: channels with saliency, values with the "
             "other objectives.")] = None,
    loss: Annotated[str, typer.Option(
        help="'labels' (next-token cross-entropy) or 'dense' (KL to the dense model's own next-token "
             "distribution; it stays on the device beside the pass).")] = "labels",
    max_steps: MaxSteps = 200,
    seq_len: SeqLen = 256,
    batch_size: BatchSize = 4,
    lora_rank: LoraRank = None,
    lora_alpha: Annotated[Optional[float], typer.Option(help="LoRA scale numerator (default: the rank, "
                                                             "scale 1).")] = None,
    lora_lr: Annotated[Optional[float], typer.Option(
        help="LoRA learning rate (AdamW; default: 1e-3 up to 60 steps, then shrinking as the square root of "
             "--max-steps).")] = None,
    mask_init: Annotated[float, typer.Option(help="Initial value of every mask.")] = 1.0,
    mask_lr: Annotated[Optional[float], typer.Option(
        help="Mask learning rate (default: from --max-steps, so masks can die within a tenth of the "
             "budget).")] = None,
    lambda_schedule: Annotated[str, typer.Option(
        help="'controller' (steered to reach --stop-ratio within --schedule-fraction of the budget) or "
             "'geometric' (x --lambda-growth every --lambda-every steps).")] = "controller",
    lambda_init: Annotated[float, typer.Option(help="Initial strength (controller: in units of the data's "
                                                    "pull).")] = 0.5,
    lambda_growth: Annotated[Optional[float], typer.Option(help="Growth factor of lambda (default: from "
                                                                "--max-steps).")] = None,
    lambda_every: Annotated[int, typer.Option(help="Steps between growths of a geometric schedule.")] = 1,
    schedule_fraction: Annotated[float, typer.Option(
        help="controller: the fraction of the budget in which the size reaches --stop-ratio.")] = 0.8,
    drr_beta: Annotated[float, typer.Option(help="drr: how sharply 1 - exp(-beta |mask|) saturates.")] = 5.0,
    nuclear_smoothness: Annotated[float, typer.Option(
        help="nuclear: weight of the first-difference smoothness penalty.")] = 0.0,
    basis: Annotated[str, typer.Option(help="'whitened' (activation-aware SVD) or 'plain' SVD.")] = "whitened",
    whitening_windows: WhiteningWindows = 16,
    gradient_checkpointing: GradientCheckpointing = True,
    include: Annotated[Optional[str], typer.Option(help="Regex: only layers whose name matches.")] = None,
    exclude: Annotated[Optional[str], typer.Option(help="Regex: skip layers whose name matches.")] = None,
    seed: Seed = 0,
    save_every: SaveEvery = 10,
    device: Device = None,
    dtype: Dtype = None,
    overwrite: Overwrite = False,
    dry_run: DryRun = False,
    revision: Revision = None,
    token: Token = None,
    trust_remote_code: TrustRemoteCode = False,
):
    """Run one ACIP pass into a compressible directory; `materialize` then builds any size from it."""
    from ..acip import AcipConfig, acip
    from ..training import clear_progress, fsdp_requested
    from ..data import TextSource, calibration_data
    from ..loading import load_model, process_state, resolve_device, resolve_dtype

    if dry_run:
        return print_plan(model, device, dtype, trust_remote_code, revision, token, batch_size=batch_size, seq_len=seq_len,
                          num_processes=process_state().num_processes, fsdp=fsdp_requested(process_state()),
                          whitening_windows=whitening_windows,
                          lora_rank=lora_rank, gradient_checkpointing=gradient_checkpointing)
    check_output_dir(output, overwrite)
    check_ratio(stop_ratio, allow_one=False)
    if device not in (None, "auto", "cpu"):
        raise HfCompressError("the pass runs where Accelerate puts it: --device takes only cpu or auto; "
                              "pick GPUs with CUDA_VISIBLE_DEVICES or accelerate launch")
    if device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"  # read by Accelerate before it picks a device
    config = config_from(AcipConfig, locals())
    progress = progress_dir(output)
    if overwrite:
        clear_progress(progress)
    start = time.perf_counter()
    net, tokenizer = load_model(model, resolve_dtype(dtype, resolve_device(device)),
                                trust_remote_code=trust_remote_code, revision=revision, token=token)
    data = calibration_data(tokenizer, config_from(TextSource, locals()), seq_len=seq_len)
    result = acip(net, data, config, tokenizer=tokenizer, progress_dir=progress)
    result.summary |= {"dataset": dataset, "seq_len": seq_len, "windows": len(data)}  # for the model card
    if process_state().is_main_process:
        result.save_pretrained(output, overwrite=overwrite)
        clear_progress(progress)
        s = result.summary
        console.print(
            f"[green]wrote[/green] {output}: {s['steps']} steps, size ratio {s['final_ratio']:.3f}, "
            f"{time.perf_counter() - start:.0f} s\n"
            f"next: hf-compress materialize {output} --size-ratio 0.6 --output {output}-0.6"
        )


@app.command("plan")
def plan_command(
    model: Annotated[str, typer.Argument(help=MODEL_HELP.replace(", .gguf file", ""))],
    batch_size: BatchSize = 4,
    seq_len: SeqLen = 256,
    num_processes: Annotated[int, typer.Option(help="Processes (GPUs) the pass runs on.")] = 1,
    fsdp: Annotated[bool, typer.Option(help="Plan the pass sharded over the processes (FSDP) instead of data "
                                            "parallel (DDP).")] = False,
    whitening_windows: WhiteningWindows = 16,
    lora_rank: LoraRank = None,
    gradient_checkpointing: GradientCheckpointing = True,
    device: Device = None,
    dtype: Dtype = None,
    memory: Annotated[Optional[str], typer.Option(help="Memory of the device planned for, e.g. 80GB (default: "
                                                       "this machine's device).")] = None,
    revision: Revision = None,
    token: Token = None,
    trust_remote_code: TrustRemoteCode = False,
):
    """Predict the peak memory of `compress` per process from the config alone, and whether it fits."""
    from ..loading import parse_size

    print_plan(model, device, dtype, trust_remote_code, revision, token, memory=parse_size(memory) if memory else None,
               batch_size=batch_size, seq_len=seq_len, num_processes=num_processes, fsdp=fsdp,
               whitening_windows=whitening_windows, lora_rank=lora_rank, gradient_checkpointing=gradient_checkpointing)


def print_plan(model: str, device: str | None, dtype: str | None, trust_remote_code: bool, revision: str | None,
               token: str | None, memory: int | None = None, **settings) -> None:
    import torch

    from ..loading import resolve_device, resolve_dtype
    from ..plan import device_capacity, meta_model, plan_memory

    if settings["batch_size"] % settings["num_processes"]:
        raise HfCompressError(f"batch size {settings['batch_size']} must be a multiple of the "
                              f"{settings['num_processes']} processes")
    target = resolve_device(device)
    net = meta_model(model, trust_remote_code, revision, token)
    chosen = resolve_dtype(dtype, target)
    if chosen == "auto":  # the source's own dtype, as the pass would load it
        chosen = getattr(net.config, "dtype", None) or torch.float32
    chosen = getattr(torch, chosen) if isinstance(chosen, str) else chosen
    plan = plan_memory(net, dtype_bytes=chosen.itemsize, on_gpu=target.type == "cuda",
                       capacity_bytes=memory or device_capacity(target), **settings)
    table = Table(title=f"memory plan of compress: {model}, {str(chosen).removeprefix('torch.')}, "
                        f"{settings['num_processes']} process(es){' FSDP' if settings['fsdp'] else ''}, "
                        f"batch {settings['batch_size']} x {settings['seq_len']}")
    table.add_column("stage")
    table.add_column(f"{target.type} per process", justify="right")
    table.add_column("host per process", justify="right")
    for stage in plan.stages:
        table.add_row(stage.name, gib(stage.device_bytes), gib(stage.host_bytes))
    console.print(table)
    if plan.fits is None:
        console.print(f"peak {gib(plan.peak_bytes)} per process; {target} is not here: give --memory to check a fit")
    elif plan.fits:
        console.print(f"[green]fits[/green]: peak {gib(plan.peak_bytes)} of {gib(plan.capacity_bytes)} on {target}")
    else:
        console.print(f"[red]does not fit[/red]: peak {gib(plan.peak_bytes)} of {gib(plan.capacity_bytes)} on "
                      f"{target}; lower --batch-size or --seq-len, or keep gradient checkpointing on")


def gib(value: int) -> str:
    return f"{value / 2**30:,.2f} GiB"
