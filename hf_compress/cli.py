"""The `hf-compress` command line. Every user mistake is one line on stderr and exit code 1."""

from __future__ import annotations

import json
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
MODEL_HELP = "Hub id, local checkpoint directory, .gguf file, or 'demo' (the bundled SmolLM2-135M)."


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
    dataset: str = typer.Option("builtin", help="Calibration text: 'builtin', a .txt/.jsonl/.parquet file, or a Hub dataset id."),
    dataset_config: Optional[str] = typer.Option(None, help="Hub dataset configuration name."),
    dataset_split: str = typer.Option("train", help="Hub dataset split."),
    text_column: str = typer.Option("text", help="Column holding the text (.jsonl, .parquet, Hub)."),
    stop_ratio: float = typer.Option(0.4, help="Stop once the targeted layers are this fraction of their size."),
    max_steps: int = typer.Option(200, help="Step budget of the pass."),
    seq_len: int = typer.Option(256, help="Tokens per calibration window."),
    batch_size: int = typer.Option(4, help="Windows per step (global, across processes)."),
    lora_rank: int = typer.Option(0, help="Rank of LoRA adapters trained with the masks (0: none)."),
    basis: str = typer.Option("whitened", help="'whitened' (activation-aware SVD) or 'plain' SVD."),
    include: Optional[str] = typer.Option(None, help="Regex: only layers whose name matches."),
    exclude: Optional[str] = typer.Option(None, help="Regex: skip layers whose name matches."),
    seed: int = typer.Option(0, help="Seed for data order and LoRA init."),
    save_every: int = typer.Option(10, help="Steps between resumable checkpoints."),
    overwrite: bool = typer.Option(False, help="Replace OUTPUT and discard an unfinished pass."),
):
    """Run one ACIP pass; afterwards `materialize` builds any size from OUTPUT in about a second."""
    from accelerate import PartialState

    from .acip import AcipConfig, acip
    from .acip.train import clear_progress
    from .data import calibration_data
    from .io import check_output
    from .models import load_model

    check_output(output, overwrite)
    _check_ratio(stop_ratio, allow_one=False)
    config = AcipConfig(stop_ratio=stop_ratio, max_steps=max_steps, batch_size=batch_size,
                        lora_rank=lora_rank, basis=basis, include=include, exclude=exclude,
                        seed=seed, save_every=save_every)
    progress = _progress_dir(output)
    if overwrite:
        clear_progress(progress)
    start = time.perf_counter()
    net, tokenizer = load_model(model)
    data = calibration_data(tokenizer, dataset, seq_len=seq_len, text_column=text_column,
                            dataset_config=dataset_config, dataset_split=dataset_split)
    result = acip(net, data, config, tokenizer=tokenizer, progress_dir=progress)
    if PartialState().is_main_process:
        result.save_pretrained(output, overwrite=overwrite)
        clear_progress(progress)
        s = result.summary
        console.print(
            f"[green]wrote[/green] {output}: {s['steps']} steps, size ratio {s['final_ratio']:.3f}, "
            f"{time.perf_counter() - start:.0f} s\n"
            f"next: hf-compress materialize {output} --size-ratio 0.6 --output {output}-0.6"
        )


@app.command()
def materialize(
    path: Path = typer.Argument(..., help="Compressible directory written by `compress`."),
    size_ratio: float = typer.Option(..., help="Fraction of the targeted parameters to keep, in (0, 1]."),
    output: Path = typer.Option(..., "--output", "-o", help="Checkpoint directory to write."),
    overwrite: bool = typer.Option(False, help="Replace OUTPUT if it exists."),
):
    """Write a checkpoint of the given size that AutoModelForCausalLM loads."""
    from .acip import CompressibleModel
    from .checkpoint import save_checkpoint
    from .io import check_output

    _check_ratio(size_ratio)
    check_output(output, overwrite)
    compressible = CompressibleModel.from_pretrained(path)
    model = compressible.materialize(size_ratio)
    save_checkpoint(model, compressible.tokenizer, output, overwrite=overwrite)
    info = model.config.hf_compress
    console.print(
        f"[green]wrote[/green] {output}: size ratio {info['size_ratio']:.4f} "
        f"({info['target_params']:,} of {info['target_dense_params']:,} targeted parameters, "
        f"{len(info['ranks'])} layers factorized) in {model.materialize_seconds:.2f} s"
    )


@app.command("fold")
def fold_command(
    model: str = typer.Argument(..., help=MODEL_HELP),
    ratio: float = typer.Option(..., help="Fraction of MLP channels kept in each folded block, in (0, 1]."),
    output: Path = typer.Option(..., "--output", "-o", help="Checkpoint directory to write."),
    heads_ratio: float = typer.Option(1.0, help="Fraction of key/value head groups kept (1.0: attention untouched)."),
    layers: str = typer.Option(
        "middle", help="Schedule: 'middle' (all but the first two and last two blocks), 'all' (same architecture, "
        "no remote code), or blocks and ranges with optional ratios, e.g. '2-27' or '2-9=0.95,10-27=0.8'."),
    method: str = typer.Option("kmeans", help="'kmeans' (merge clusters) or 'magnitude' (prune, the baseline)."),
    variance_correction: bool = typer.Option(False, help="Rescale merged units to their members' norm."),
    seed: int = typer.Option(0, help="k-means seed."),
    overwrite: bool = typer.Option(False, help="Replace OUTPUT if it exists."),
):
    """Fold a model data-free into a smaller one of the same architecture."""
    from .checkpoint import save_checkpoint
    from .fold import FoldConfig, fold
    from .io import check_output
    from .models import load_model

    config = FoldConfig(ratio=ratio, heads_ratio=heads_ratio, layers=_parse_layers(layers, ratio), method=method,
                        variance_correction=variance_correction, seed=seed)
    check_output(output, overwrite)
    net, tokenizer = load_model(model)
    start = time.perf_counter()
    fold(net, config)
    seconds = time.perf_counter() - start
    save_checkpoint(net, tokenizer, output, overwrite=overwrite)
    info = net.config.hf_compress
    kind = "per-layer sizes (self-contained, trust_remote_code)" if info["shapes"] else "same architecture, no remote code"
    console.print(f"[green]wrote[/green] {output}: size ratio {info['size_ratio']:.4f}, {kind}, folded in {seconds:.1f} s")


def _parse_layers(text: str, ratio: float) -> str | dict[int, float]:
    """'middle', 'all', or '0-3,7' / '2-9=0.95,10-27=0.8' (blocks without a ratio take --ratio)."""
    if text.strip() in ("middle", "all"):
        return text.strip()
    plan = {}
    try:
        for part in text.split(","):
            blocks, _, block_ratio = part.partition("=")
            low, _, high = blocks.partition("-")
            plan |= dict.fromkeys(range(int(low), int(high or low) + 1), float(block_ratio) if block_ratio else ratio)
    except ValueError:
        raise HfCompressError(
            f"--layers takes 'middle', 'all' or blocks and ranges like '0-3,7' or '2-9=0.95,10-27=0.8', got '{text}'"
        ) from None
    return plan


@app.command()
def info(
    path: str = typer.Argument(..., help=f"A compressible directory or a model ({MODEL_HELP})"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
):
    """Per-layer ranks, parameters and bytes of a model or a compressible directory."""
    from .acip.compressible import META_FILE

    if (Path(path) / META_FILE).is_file():
        report = _compressible_report(Path(path))
    else:
        from .models import load_model, size_report

        report = size_report(load_model(path)[0])
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)


@app.command("eval")
def evaluate_command(
    path: str = typer.Argument(..., help=f"A compressible directory, a materialized checkpoint, or a model ({MODEL_HELP})"),
    size_ratios: str = typer.Option("0.4,0.6,0.8,1.0", help="Sizes to evaluate from a compressible directory."),
    dataset: str = typer.Option("builtin", help="Perplexity text: 'builtin' (its held-out split), a file, or a Hub dataset id."),
    dataset_config: Optional[str] = typer.Option(None, help="Hub dataset configuration name."),
    dataset_split: str = typer.Option("test", help="Hub dataset split."),
    text_column: str = typer.Option("text", help="Column holding the text."),
    seq_len: int = typer.Option(512, help="Tokens per perplexity window."),
    max_windows: Optional[int] = typer.Option(None, help="Evaluate at most this many windows (default: all)."),
    no_perplexity: bool = typer.Option(False, help="Skip perplexity (tasks only)."),
    tasks: Optional[str] = typer.Option(None, help="Comma-separated lm-eval tasks, e.g. pydoc_cloze (offline, built in)."),
    include_path: Optional[str] = typer.Option(None, help="Folder of local lm-eval task YAMLs."),
    limit: Optional[int] = typer.Option(None, help="lm-eval: at most this many documents per task."),
    batch_size: int = typer.Option(4, help="Batch size for perplexity and lm-eval."),
    output: Optional[Path] = typer.Option(None, help="Write results (with protocol and versions) to this JSON file."),
    plot: Optional[Path] = typer.Option(None, help="Write the size/quality curve to this PNG."),
):
    """Perplexity and lm-eval tasks of a model, or of many sizes from one compressible directory."""
    from . import evaluate as ev
    from .acip.compressible import META_FILE
    from .data import calibration_data
    from .models import load_model

    task_list = [t for t in (tasks or "").split(",") if t]
    if no_perplexity and not task_list:
        raise HfCompressError("nothing to evaluate: drop --no-perplexity or name --tasks")
    if (Path(path) / META_FILE).is_file():
        from .acip import CompressibleModel

        ratios = _parse_ratios(size_ratios)
        compressible = CompressibleModel.from_pretrained(path)
        tokenizer = compressible.tokenizer
        models = (compressible.materialize(r) for r in ratios)
    else:
        net, tokenizer = load_model(path)
        models = iter([net])
    windows = None
    if not no_perplexity:
        split = "heldout" if dataset == "builtin" else "calibration"
        windows = calibration_data(tokenizer, dataset, seq_len=seq_len, split=split, max_windows=max_windows,
                                   text_column=text_column, dataset_config=dataset_config,
                                   dataset_split=dataset_split)
    records = []
    for model in models:
        record = ev.evaluate(model, tokenizer, windows, task_list, include_path=include_path, limit=limit,
                             batch_size=batch_size)
        records.append(record)
        console.print(f"size ratio {record['size_ratio']:.3f}: " + _summarize(record), highlight=False)
    _print_records(records)
    protocol = {
        "perplexity": None if windows is None else {
            "dataset": dataset, "split": "heldout" if dataset == "builtin" else dataset_split,
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


def _compressible_report(path: Path) -> dict:
    from .acip import CompressibleModel

    compressible = CompressibleModel.from_pretrained(path)
    sizes = []
    for ratio in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0):
        ranks = compressible.ranks_at(ratio)
        params = sum(compressible.layers[n].params(r) for n, r in ranks.items())
        factorized = sum(not f.shape.is_dense_at(ranks[n] + f.lora_rank) for n, f in compressible.layers.items())
        sizes.append({"size_ratio": ratio, "target_params": params, "factorized_layers": factorized})
    summary = {k: v for k, v in compressible.summary.items() if k != "history"}
    return {"compressible": str(path), "config": compressible.config.to_dict(), "summary": summary,
            "target_dense_params": compressible.dense_params, "sizes": sizes}


def _print_report(report: dict) -> None:
    out = Console(soft_wrap=True)
    if "compressible" in report:
        out.print(f"compressible directory {report['compressible']}: pass {report['summary']}")
        table = Table("size ratio", "targeted params", "factorized layers")
        for row in report["sizes"]:
            table.add_row(f"{row['size_ratio']:.1f}", f"{row['target_params']:,}", str(row["factorized_layers"]))
        out.print(table)
        return
    table = Table("layer", "shape (out x in)", "form", "params")
    for layer in report["layers"]:
        form = "dense" if layer["rank"] is None else f"rank {layer['rank']}"
        table.add_row(layer["name"], f"{layer['out']} x {layer['in']}", form, f"{layer['params']:,}")
    out.print(table)
    out.print(
        f"{report['architecture']}: targeted {report['target_params']:,} of {report['target_dense_params']:,} "
        f"parameters (size ratio {report['size_ratio']:.4f}); whole model {report['model_params']:,} "
        f"parameters, {report['model_bytes'] / 2**20:.1f} MiB"
    )


def _show_warning(message, category, filename, lineno, file=None, line=None):
    console.print(f"[yellow]warning:[/yellow] {message}", highlight=False)


def main() -> None:
    warnings.showwarning = _show_warning
    try:
        app()
    except HfCompressError as err:
        console.print(f"[red]error:[/red] {err}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: rerun the same command to resume the pass")
        sys.exit(130)
