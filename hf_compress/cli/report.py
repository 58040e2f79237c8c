"""`info`, `eval` and `push`: what a directory holds, how good it is, and the Hub."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from ..errors import HfCompressError
from .app import (app, check_quantize, check_ratio, config_from, console, load, load_compressible, placement,
                  ratio_within_loss)
from .options import (MODEL_HELP, Compensate, Dataset, DatasetConfig, DatasetRevision, DatasetSplit, Device, DeviceMap,
                      DryRun, Dtype, MaxLossIncrease, MaxMemory, Quantize, Revision, SeqLen, SpeedAware, Structure, TextColumn,
                      Token, TrustRemoteCode)


@app.command()
def info(
    path: Annotated[str, typer.Argument(help=f"A compressible directory or a model ({MODEL_HELP})")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    revision: Revision = None,
    token: Token = None,
    trust_remote_code: TrustRemoteCode = False,
):
    """Per-layer ranks, parameters and bytes of a model or a compressible directory."""
    from ..formats import META_FILE, disk_bytes

    if (Path(path) / META_FILE).is_file():
        from ..acip import CompressibleModel

        compressible = CompressibleModel.from_pretrained(path, trust_remote_code, **placement(device_map, max_memory))
        report = {"compressible": path, **compressible.report(),
                  "other_bytes": disk_bytes(Path(path))[1] - (Path(path) / META_FILE).stat().st_size}
    else:
        report = checkpoint_report(path, trust_remote_code, revision, token, device_map, max_memory)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)


@app.command("eval")
def evaluate_command(
    path: Annotated[str, typer.Argument(help=f"A compressible directory, a materialized checkpoint, or a model "
                                             f"({MODEL_HELP})")],
    size_ratios: Annotated[str, typer.Option(
        help="Sizes to evaluate from a compressible directory, or 'auto': the smallest within "
             "--max-loss-increase.")] = "0.4,0.6,0.8,1.0",
    max_loss_increase: MaxLossIncrease = 0.02,
    dataset: Dataset = "builtin",
    dataset_config: DatasetConfig = None,
    dataset_split: DatasetSplit = "test",
    text_column: TextColumn = "text",
    dataset_revision: DatasetRevision = None,
    seq_len: SeqLen = 512,
    max_windows: Annotated[Optional[int], typer.Option(help="Evaluate at most this many windows (default: "
                                                            "all).")] = None,
    no_perplexity: Annotated[bool, typer.Option(help="Skip perplexity (tasks only).")] = False,
    tasks: Annotated[Optional[str], typer.Option(
        help="Comma-separated lm-eval tasks or groups by the harness' names, e.g. "
             "arc_easy,arc_challenge,hellaswag,piqa,winogrande,boolq or mmlu (downloaded once), or pydoc_cloze "
             "(offline, built in).")] = None,
    include_path: Annotated[Optional[str], typer.Option(help="Folder of local lm-eval task YAMLs.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="lm-eval: at most this many documents per task.")] = None,
    num_fewshot: Annotated[Optional[int], typer.Option(help="lm-eval: examples in each prompt (default: each task's "
                                                            "own, mostly 0; MMLU is reported 5-shot).")] = None,
    apply_chat_template: Annotated[bool, typer.Option(help="lm-eval: wrap prompts in the tokenizer's chat template "
                                                           "(few-shot examples as turns).")] = False,
    batch_size: Annotated[Optional[str], typer.Option(
        help="Windows per forward pass, and lm-eval's batch size: a number, or 'auto' for lm-eval to find the "
             "largest that fits on a GPU (slow on CPU, where nothing runs out; default 4 on CPU, 16 on GPU; "
             "perplexity uses that default with auto).")] = None,
    quantize: Quantize = None,
    speed_aware: SpeedAware = False,
    structure: Structure = "mixed",
    compensate: Compensate = None,
    device: Device = None,
    dtype: Dtype = None,
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    output: Annotated[Optional[Path], typer.Option(help="Write results (with protocol and versions) to this JSON "
                                                        "file.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write the size/quality curve to this PNG.")] = None,
    revision: Revision = None,
    token: Token = None,
    trust_remote_code: TrustRemoteCode = False,
):
    """Perplexity and lm-eval tasks of a model, or of many sizes from one compressible directory."""
    from .. import evaluate as ev
    from ..cards import update_card
    from ..data import TextSource, builtin_corpus, calibration_data
    from ..formats import META_FILE
    from ..loading import resolve_device

    task_list = [t for t in (tasks or "").split(",") if t]
    if no_perplexity and not task_list:
        raise HfCompressError("nothing to evaluate: drop --no-perplexity or name --tasks")
    check_quantize(quantize)
    text = config_from(TextSource, locals())
    default_batch = 4 if resolve_device(device).type == "cpu" else 16
    batch_size = parse_batch_size(batch_size) or default_batch
    task_options = config_from(ev.TaskOptions, locals())
    windows_batch = default_batch if batch_size == "auto" else batch_size
    if (Path(path) / META_FILE).is_file():
        compressible = load_compressible(path, device, dtype, trust_remote_code, device_map, max_memory)
        tokenizer = compressible.tokenizer
        if size_ratios.strip() == "auto":
            ratios = [ratio_within_loss(compressible, max_loss_increase, text, seq_len, 8, quantize,
                                        structure=structure, compensate=compensate)[0]]
        else:
            ratios = parse_ratios(size_ratios)
        models = (compressible.materialize(r, quantize=quantize, speed_aware=speed_aware, structure=structure,
                                           compensate=compensate) for r in ratios)
    else:
        if quantize:
            raise HfCompressError("--quantize applies to sizes from a compressible directory; quantize a "
                                  "checkpoint with `hf-compress quantize` first")
        if speed_aware:
            raise HfCompressError("--speed-aware applies to sizes from a compressible directory; materialize "
                                  "one with `hf-compress materialize --speed-aware`")
        net, tokenizer = load(path, device, dtype, trust_remote_code, revision, token, device_map, max_memory)
        models = iter([net])
    windows = None
    if not no_perplexity:
        split = "test" if builtin_corpus(dataset) else "calibration"
        windows = calibration_data(tokenizer, text, seq_len=seq_len, split=split, max_windows=max_windows)
    windows_bytes = None if windows is None else ev.text_bytes(tokenizer, windows)
    records = []
    for model in models:
        record = ev.evaluate(model, tokenizer, windows, task_list, windows_batch, windows_bytes, task_options)
        records.append(record)
        console.print(f"size ratio {record['size_ratio']:.3f}: " + summarize(record), highlight=False)
    print_records(records)
    result = ev.results_document(str(path), records, windows, dataset, dataset_split, seq_len, task_list, task_options)
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
    path: Annotated[Path, typer.Argument(help="A checkpoint or compressible directory written by hf-compress.")],
    repo_id: Annotated[str, typer.Option(help="Hub repository, 'user/name' (created if missing).")],
    private: Annotated[bool, typer.Option(help="Create the repository as private.")] = False,
    dry_run: DryRun = False,
    token: Token = None,
):
    """Upload a directory to the Hub with a model card made from what it records: one commit, or one per
    5 GiB of files, so that an interrupted push resumes when rerun."""
    from ..hub import push as push_directory

    plan = push_directory(path, repo_id, private=private, dry_run=dry_run, token=token)
    if dry_run:
        print(plan["card"])
    card = "its own README.md" if plan["own_card"] else "a generated model card"
    where = plan.get("url", f"{repo_id} (dry run, nothing uploaded)")
    commits = f" in {plan['commits']} commits (rerun to resume if interrupted)" if plan["commits"] > 1 else ""
    console.print(f"[green]{'would push' if dry_run else 'pushed'}[/green] {len(plan['files'])} files with {card} "
                  f"to {where}{commits}", highlight=False)


def parse_batch_size(text: str | None) -> int | str | None:
    if text is None or text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise HfCompressError(f"--batch-size must be a positive number or auto, got '{text}'")
    return int(text)


def parse_ratios(text: str) -> list[float]:
    try:
        ratios = sorted({float(r) for r in text.split(",") if r.strip()})
    except ValueError:
        raise HfCompressError(f"--size-ratios must be comma-separated numbers, got '{text}'") from None
    for ratio in ratios:
        check_ratio(ratio)
    return ratios


def summarize(record: dict) -> str:
    parts = [f"perplexity {record['perplexity']:.3f}"] if "perplexity" in record else []
    for task, metrics in record.get("tasks", {}).items():
        parts += [f"{task} {name} {value:.4f}" for name, value in metrics.items()]
    return ", ".join(parts)


def print_records(records: list[dict]) -> None:
    from ..evaluate import results_table

    columns, rows = results_table(records)
    table = Table(*columns)
    for row in rows:
        table.add_row(*row)
    Console(soft_wrap=True).print(table)


def checkpoint_report(path: str, trust_remote_code: bool, revision: str | None = None, token: str | None = None,
                      device_map: str | None = None, max_memory: str | None = None) -> dict:
    from ..formats import disk_bytes, size_report
    from ..loading import load_model

    model = load_model(path, trust_remote_code=trust_remote_code, revision=revision, token=token,  # its own dtype
                       **placement(device_map, max_memory))[0]
    report = size_report(model)
    if Path(path).is_dir():
        report["file_bytes"], report["other_bytes"] = disk_bytes(Path(path))
    return report


def print_report(report: dict) -> None:
    out = Console(soft_wrap=True)
    if "compressible" in report:
        out.print(f"compressible directory {report['compressible']}: pass {report['summary']}")
        table = Table("size ratio", "targeted params", "MLP channels removed", "head groups removed",
                      "factorized layers", "MiB", "MiB int8", "MiB nf4")
        for row in report["sizes"]:
            table.add_row(f"{row['size_ratio']:.1f}", f"{row['target_params']:,}", str(row["mlp_channels"]),
                          str(row["head_groups"]), str(row["factorized_layers"]),
                          *("-" if row[key] is None else f"{row[key] / 2**20:.1f}"
                            for key in ("bytes", "bytes_int8", "bytes_nf4")))
        out.print(table)
        out.print(f"What `materialize` removes at each ratio (the default structure, mixed; the smallest it makes is "
                  f"{report['smallest_size_ratio']:.3f}); MiB: the weight files of "
                  "the checkpoint it writes, headers included (with --quantize for the last two columns); its config, "
                  f"tokenizer and card add {report['other_bytes'] / 2**20:.1f} MiB.")
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
    files = (f"; on disk {report['file_bytes'] / 2**20:.1f} MiB of weight files ({report['file_bytes']:,} bytes) and "
             f"{report['other_bytes'] / 2**20:.1f} MiB of config, tokenizer and card") if "file_bytes" in report else ""
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
