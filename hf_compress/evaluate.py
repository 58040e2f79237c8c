"""Measure models: held-out perplexity with one protocol, and lm-eval tasks on in-memory models.

Perplexity protocol: the text is tokenized and cut into non-overlapping windows of `seq_len`
tokens (no BOS added, no context carried across windows); perplexity = exp(mean NLL) over every
predicted token (seq_len - 1 per window). Default: the `builtin` test split, 512-token
windows, all of them. Bits per byte divide the text's bits by the UTF-8 bytes those tokens
decode to; the description length adds the bits of the model's weights.
"""

from __future__ import annotations

import functools
import json
import math
import platform
import random
import re
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import builtin_corpus, builtin_text
from .errors import HfCompressError
from .formats import size_report
from .loading import cache_dir
from .offload import input_device

BUILTIN_TASK = "pydoc_cloze"
RESULTS_FILE = "eval_results.json"
STDERR = "_stderr"  # lm-eval's name for a metric's standard error


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, show_progress: bool = False) -> dict:
    """exp(mean NLL) over every predicted token of the (n x seq_len) windows, each scored
    independently (no context carried across windows)."""
    device = input_device(model)
    total_nll, total_tokens = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc="perplexity", disable=not show_progress, leave=False):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    return {"perplexity": math.exp(total_nll / total_tokens), "loss": total_nll / total_tokens,
            "bits": total_nll / math.log(2), "tokens": total_tokens, "windows": len(windows), "seq_len": windows.shape[1]}


def text_bytes(tokenizer, windows: torch.Tensor) -> int:
    """UTF-8 bytes of the text the perplexity windows predict (every token after the first)."""
    return sum(len(tokenizer.decode(row[1:]).encode("utf-8")) for row in windows)


# --- lm-eval -------------------------------------------------------------------------------


def builtin_task_dir(n_items: int = 200, seed: int = 0) -> Path:
    """An offline lm-eval task, written once: pick the sentence that really comes next.

    Items come from the last 20% (by characters) of the builtin corpus: the context is one
    sentence, the choices are the sentence that follows it and three sentences drawn from
    elsewhere in that part. Scored by lm-eval's multiple-choice log-likelihood (acc, acc_norm).
    """
    folder = cache_dir() / "lm_eval_tasks" / f"{BUILTIN_TASK}-v1"
    yaml_path = folder / f"{BUILTIN_TASK}.yaml"
    if yaml_path.is_file():
        return folder
    text = builtin_text()
    heldout = text[int(len(text) * 0.8):]
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(heldout.split()))]
    sentences = [s for s in sentences if 8 <= len(s.split()) <= 40]
    rng = random.Random(seed)
    starts = rng.sample(range(len(sentences) - 1), n_items)
    rows = []
    for start in starts:
        distractors = rng.sample([s for i, s in enumerate(sentences) if i not in (start, start + 1)], 3)
        label = rng.randrange(4)
        choices = distractors[:label] + [sentences[start + 1]] + distractors[label:]
        rows.append({"context": sentences[start], "choices": choices, "label": label})
    folder.mkdir(parents=True, exist_ok=True)
    data_path = folder / f"{BUILTIN_TASK}.jsonl"
    data_path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    yaml_path.write_text(
        f"task: {BUILTIN_TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files: {json.dumps(str(data_path))}\n"
        "test_split: train\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )
    return folder


@dataclass(frozen=True)
class TaskOptions:
    """How lm-eval runs the tasks, as the harness' own flags: few-shot examples, a document limit,
    the chat template, and the batch size (a number, or 'auto': the largest that fits)."""

    include_path: str | None = None
    limit: int | None = None
    num_fewshot: int | None = None
    apply_chat_template: bool = False
    batch_size: int | str = 8


def lm_eval_tasks(model, tokenizer, tasks: list[str], options: TaskOptions = TaskOptions()) -> tuple[dict, dict]:
    """Run lm-eval's simple_evaluate on the in-memory model. Returns {task or group: {metric: value,
    metric_stderr: its standard error}} as the harness reports them (its default bootstrap), and how
    it ran them: examples per prompt by task, the chat template applied (or None)."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise HfCompressError("lm-eval tasks need the lm-eval package: pip install lm-eval") from None
    manager = _task_manager(options.include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise HfCompressError(f"unknown lm-eval task(s) {unknown}: the harness' task and group names (lm-eval ls "
                              "tasks), or local task YAMLs in --include-path")
    if options.apply_chat_template and not getattr(tokenizer, "chat_template", None):
        raise HfCompressError("--apply-chat-template needs a tokenizer with a chat template, and this one has none")
    device = str(input_device(model))
    wrapper = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=options.batch_size, device=device)
    output = simple_evaluate(wrapper, tasks=tasks, task_manager=manager, limit=options.limit,
                             num_fewshot=options.num_fewshot, apply_chat_template=options.apply_chat_template,
                             log_samples=False)
    results = {}
    for task, metrics in output["results"].items():
        results[task] = {name.split(",")[0]: value for name, value in metrics.items()
                         if isinstance(value, (int, float)) and name != "sample_len" and "," in name}
    template = wrapper.chat_template(True) if options.apply_chat_template else None  # the one lm-eval applied
    return results, {"n_shot": output.get("n-shot", {}), "chat_template": template}


@functools.cache
def _task_manager(include_path: str | None):
    """Indexing lm-eval's thousands of task YAMLs takes a while: once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(builtin_task_dir())] + ([include_path] if include_path else []))


# --- one evaluation record, results files, plots ------------------------------------------


def evaluate(model, tokenizer, windows: torch.Tensor | None, tasks: list[str] = (), batch_size: int = 4,
             windows_bytes: int | None = None, task_options: TaskOptions = TaskOptions()) -> dict:
    """Perplexity and task metrics of one model, with its size; `windows_bytes` (the
    `text_bytes` of the windows) saves decoding them again for every size of a sweep."""
    report = size_report(model)
    record = {key: report[key] for key in ("size_ratio", "target_params", "target_dense_params",
                                           "model_params", "model_bytes")}
    record["quantization"] = (report["quantization"] or {}).get("method")
    if windows is not None:
        scored = perplexity(model, windows, batch_size, show_progress=True)
        record["perplexity"] = scored["perplexity"]
        # Description length (arXiv 2505.17469): the text's bits under the model plus the model's own.
        record["bits_per_byte"] = scored["bits"] / (windows_bytes or text_bytes(tokenizer, windows))
        record["description_length_bits"] = scored["bits"] + 8 * record["model_bytes"]
    if tasks:
        record["tasks"], record["lm_eval"] = lm_eval_tasks(model, tokenizer, list(tasks), task_options)
    return record


def versions() -> dict:
    names = ("hf-compress", "torch", "transformers", "accelerate", "lm_eval")
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found | {"python": platform.python_version()}


def results_document(model: str, records: list[dict], windows: torch.Tensor | None, dataset: str,
                     dataset_split: str, seq_len: int, tasks: list[str], task_options: TaskOptions) -> dict:
    """What `eval` writes: the records, the protocol that produced them, versions, and the Hub's
    model-index entries."""
    test_split = "test" if builtin_corpus(dataset) else dataset_split
    protocol = {
        "perplexity": None if windows is None else {
            "dataset": dataset, "split": test_split, "seq_len": seq_len, "windows": len(windows),
            "tokens": len(windows) * (seq_len - 1), "method": "non-overlapping windows, token-level mean NLL, exp"},
        "tasks": tasks and {"names": tasks, **asdict(task_options)},
    }
    return {"model": model, "protocol": protocol, "versions": versions(), "results": records,
            "model_index": model_index(Path(model).name or model, records, dataset if windows is not None else "")}


def model_index(name: str, records: list[dict], dataset: str) -> list[dict]:
    """Results in the Hub model card's `model-index` shape (one entry per evaluated size)."""
    entries = []
    for record in records:
        results = []
        if "perplexity" in record:
            results.append({"task": {"type": "text-generation", "name": "Perplexity"},
                            "dataset": {"type": dataset, "name": dataset},
                            "metrics": [{"type": "perplexity", "value": round(record["perplexity"], 4)}]})
        for task, metrics in record.get("tasks", {}).items():
            results.append({"task": {"type": "text-generation", "name": task},
                            "dataset": {"type": task, "name": task},
                            "metrics": [{"type": m, "value": round(v, 4)} for m, v in metrics.items()
                                        if not m.endswith(STDERR)]})
        entries.append({"name": f"{name}@{record['size_ratio']:.2f}", "results": results})
    return entries


def results_table(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Column names and formatted rows of evaluation records, smallest size first (for the
    terminal and for model cards)."""
    records = sorted(records, key=lambda r: r["size_ratio"])
    tasks = task_metrics(records[0])
    with_perplexity = "perplexity" in records[0]
    with_length = "bits_per_byte" in records[0]  # results files before description lengths lack it
    columns = ["size ratio", "targeted params", "model MiB"] + ["perplexity"] * with_perplexity
    columns += ["bits/byte", "description length Mbit"] * with_length
    rows = []
    for r in records:
        cells = [f"{r['size_ratio']:.3f}", f"{r['target_params']:,}", f"{r['model_bytes'] / 2**20:.1f}"]
        cells += [f"{r['perplexity']:.3f}"] * with_perplexity
        if with_length:
            cells += [f"{r['bits_per_byte']:.4f}", f"{r['description_length_bits'] / 1e6:,.1f}"]
        for task, metric in tasks:
            value, stderr = r["tasks"][task][metric], r["tasks"][task].get(metric + STDERR)
            cells.append(f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else ""))
        rows.append(cells)
    return columns + [f"{t} {m}" for t, m in tasks], rows


def task_metrics(record: dict) -> list[tuple[str, str]]:
    """(task, metric) of every task metric of a record, standard errors aside."""
    return [(t, m) for t, metrics in record.get("tasks", {}).items() for m in metrics if not m.endswith(STDERR)]


def write_json(data: dict, path: str | Path) -> None:
    """Write via a temporary file and a rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def plot_curve(records: list[dict], path: str | Path, title: str) -> None:
    """Quality against size ratio and against bytes, one line per metric. Drawn on a bare Figure,
    not pyplot, so that a notebook's inline backend is left alone."""
    from matplotlib.figure import Figure

    records = sorted(records, key=lambda r: r["size_ratio"])
    series = {}  # label -> (values, standard errors or None)
    if all("perplexity" in r for r in records):
        series["perplexity (lower is better)"] = [r["perplexity"] for r in records], None
    if all("description_length_bits" in r for r in records):
        series["description length, Mbit (text + model)"] = [r["description_length_bits"] / 1e6 for r in records], None
    for task, metric in task_metrics(records[0]):
        stderr = [r["tasks"][task].get(metric + STDERR) for r in records]
        series[f"{task} {metric}"] = [r["tasks"][task][metric] for r in records], None if None in stderr else stderr
    if not series:
        raise HfCompressError("nothing to plot: evaluate perplexity or at least one task")
    fig = Figure(figsize=(10, 3.2 * len(series)))
    axes = fig.subplots(len(series), 2, squeeze=False)
    for row, (label, (values, stderr)) in zip(axes, series.items()):
        for ax, xs, xlabel in ((row[0], [r["size_ratio"] for r in records], "size ratio (targeted layers)"),
                               (row[1], [r["model_bytes"] / 2**20 for r in records], "model size (MiB)")):
            ax.errorbar(xs, values, yerr=stderr, marker="o", capsize=3)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            if label.startswith("perplexity"):
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
