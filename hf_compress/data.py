"""Calibration and evaluation text as fixed-length token windows.

A source is `builtin` (CPython's embedded pydoc topics, ~465k characters of English technical
prose, split deterministically: first 80% of tokens for calibration, last 20% held out), a local
`.txt` / `.jsonl` / `.parquet` file, or a Hub dataset id (streamed; a local directory laid out
like a Hub dataset repository works the same way). Texts are joined with the
tokenizer's EOS token and cut into non-overlapping windows of `seq_len` tokens, each opening with
BOS when the tokenizer puts BOS at the start of what it encodes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import HfCompressError

BUILTIN = "builtin"
CALIBRATION_FRACTION = 0.8
SPLITS = ("calibration", "heldout")


def builtin_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def _local_texts(path: Path, text_column: str) -> list[str]:
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    if path.suffix not in (".jsonl", ".json", ".parquet"):
        raise HfCompressError(f"unsupported data file {path}: use .txt, .jsonl or .parquet")
    from datasets import load_dataset

    kind = "parquet" if path.suffix == ".parquet" else "json"
    dataset = load_dataset(kind, data_files=str(path), split="train")
    if text_column not in dataset.column_names:
        raise HfCompressError(f"{path} has no column '{text_column}' (it has {dataset.column_names})")
    return list(dataset[text_column])


def _hub_texts(name: str, config: str | None, split: str, text_column: str, max_chars: int):
    """Stream just enough rows of a Hub dataset."""
    from datasets import load_dataset

    try:
        stream = load_dataset(name, config, split=split, streaming=True)
    except Exception as err:  # datasets raises many types for a missing or offline dataset
        raise HfCompressError(f"cannot load dataset '{name}': {str(err).splitlines()[0]}") from None
    texts, total = [], 0
    for row in stream:
        if text_column not in row:
            raise HfCompressError(f"dataset '{name}' has no column '{text_column}'")
        texts.append(row[text_column])
        total += len(row[text_column])
        if total >= max_chars:
            break
    return texts


def calibration_data(
    tokenizer,
    source: str = BUILTIN,
    seq_len: int = 256,
    split: str = "calibration",
    max_windows: int | None = None,
    text_column: str = "text",
    dataset_config: str | None = None,
    dataset_split: str = "train",
) -> torch.Tensor:
    """Token windows of shape (n, seq_len) from `source`.

    `split` picks the builtin corpus' calibration or held-out part; other sources are used whole
    (choose a Hub split with `dataset_split`).
    """
    if split not in SPLITS:
        raise HfCompressError(f"split must be one of {SPLITS}, not '{split}'")
    if tokenizer is None:
        raise HfCompressError("the model has no tokenizer to turn text into tokens: save one beside its weights")
    if source == BUILTIN:
        texts = [builtin_text()]
    elif Path(source).is_file():
        texts = _local_texts(Path(source), text_column)
    elif source.endswith((".txt", ".jsonl", ".json", ".parquet")):
        raise HfCompressError(f"data file not found: {source}")
    else:  # a Hub dataset id, or a local dataset directory laid out like one
        max_chars = 8 * seq_len * (max_windows or 4096)  # ~4 characters a token, with margin
        texts = _hub_texts(source, dataset_config, dataset_split, text_column, max_chars)
    ids = tokenize_joined(tokenizer, texts)
    if source == BUILTIN:
        cut = int(len(ids) * CALIBRATION_FRACTION)
        ids = ids[:cut] if split == "calibration" else ids[cut:]
    bos = leading_bos(tokenizer)
    width = seq_len - len(bos)  # text tokens a window
    n = len(ids) // width if width > 0 else 0
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise HfCompressError(
            f"'{source}' has {len(ids)} tokens, fewer than one window of {seq_len}"
        )
    windows = torch.tensor(ids[: n * width], dtype=torch.long).view(n, width)
    return torch.cat([torch.tensor(bos, dtype=torch.long).expand(n, len(bos)), windows], dim=1)


def leading_bos(tokenizer) -> list[int]:
    """[BOS] if the tokenizer starts every encoded text with it (Llama, Gemma: those models were
    trained so, and Gemma degrades badly without it), else []. Each window then starts with it."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    return [bos] if tokenizer("a")["input_ids"][:1] == [bos] else []


def tokenize_joined(tokenizer, texts: list[str]) -> list[int]:
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for text in texts:
        if text:
            ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + separator)
    return ids
