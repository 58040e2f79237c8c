"""Calibration and evaluation text as fixed-length token windows.

A source is a builtin corpus, a local `.txt` / `.jsonl` / `.parquet` file, or a Hub dataset id
(streamed; a local directory laid out like a Hub dataset repository works the same way). Texts
are joined with the tokenizer's EOS token and cut into non-overlapping windows of `seq_len`
tokens, each opening with BOS when the tokenizer puts BOS at the start of what it encodes.

Builtin corpora ship inside installed packages, so everything works offline:
- `builtin:pydoc`: CPython's embedded pydoc topics, ~465k characters of technical reference prose;
- `builtin:wiki`: Wikipedia articles from gensim's test data (markup stripped by mwparserfromhell);
- `builtin:news`: the Lee corpus of ABC news articles, also from gensim's test data; no builtin
  calibration set contains it, so its figures measure text the calibration never saw;
- `builtin:mix`: pydoc and wiki together;
- `builtin`: the default corpus (DEFAULT_CORPUS, the mix: calibrated on it, the pass served
  technical, encyclopedic and unseen news text best together, bench/calibration_demo.py).
Each is split deterministically by tokens: the first 80% for calibration, the next 10% as the
test split (reported figures only) and the last 10% as the validation split (every default and
hyperparameter is chosen on it). Other sources are used whole.
"""

from __future__ import annotations

import bz2
import functools
import importlib.metadata
import io
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import torch

from .errors import HfCompressError, first_line

BUILTIN = "builtin"
CORPORA = ("pydoc", "wiki", "news", "mix")
MIX = ("pydoc", "wiki")
DEFAULT_CORPUS = "mix"  # what `builtin` means: best on every domain's validation split (docs/BENCHMARKS.md)
SPLITS = {"calibration": (0.0, 0.8), "test": (0.8, 0.9), "validation": (0.9, 1.0)}  # fractions of the tokens
GENSIM_DATA = "gensim/test/test_data/"
WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_CHARS = 500_000  # the first articles up to about the size of the pydoc corpus


@dataclass(frozen=True)
class TextSource:
    """Where text comes from: a builtin corpus, a local file, or a Hub dataset with its
    configuration, split, column and revision; `token` reads a gated or private one. Every command
    that reads text takes all of these (the CLI's dataset options)."""

    dataset: str = BUILTIN
    dataset_config: str | None = None
    dataset_split: str = "train"
    text_column: str = "text"
    dataset_revision: str | None = None
    token: str | None = None


def builtin_text() -> str:
    """The pydoc topics, sorted by key and joined with blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def _gensim_file(name: str, corpus: str) -> Path:
    """A file of gensim's test data, found without importing gensim (its data is all we use)."""
    try:
        path = Path(importlib.metadata.distribution("gensim").locate_file(GENSIM_DATA + name))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise HfCompressError(f"builtin:{corpus} (part of the default `builtin` mix) reads gensim's test data, "
                              "a dependency of hf-compress that is missing here: pip install gensim, or use builtin:pydoc")
    return path


@functools.lru_cache(maxsize=None)
def corpus_texts(corpus: str) -> tuple[str, ...]:
    """The documents of one builtin corpus (not `mix`), in a fixed order."""
    if corpus == "pydoc":
        return (builtin_text(),)
    if corpus == "news":
        lines = _gensim_file("lee_background.cor", corpus).read_text(encoding="utf-8").splitlines()
        return tuple(line.strip() for line in lines if line.strip())
    if corpus == "wiki":
        return _wiki_articles(_gensim_file(WIKI_DUMP, corpus))
    raise HfCompressError(f"unknown builtin corpus '{corpus}': use one of {', '.join(CORPORA)}")


def _wiki_articles(dump: Path) -> tuple[str, ...]:
    """Plain text of the dump's articles (not redirects), references dropped, up to WIKI_CHARS."""
    import mwparserfromhell

    articles, total = [], 0
    for _, element in ElementTree.iterparse(io.BytesIO(bz2.decompress(dump.read_bytes()))):
        if not element.tag.endswith("}page"):
            continue
        text = element.findtext("{*}revision/{*}text") or ""
        if element.findtext("{*}ns") == "0" and not text.lstrip().lower().startswith("#redirect"):
            code = mwparserfromhell.parse(text)
            for ref in code.filter_tags(matches=lambda node: str(node.tag).lower() == "ref", recursive=False):
                code.remove(ref)
            plain = "\n".join(line.strip() for line in code.strip_code().splitlines() if line.strip())
            articles.append(plain)
            total += len(plain)
        element.clear()
        if total >= WIKI_CHARS:
            break
    return tuple(articles)


def builtin_corpus(source: str) -> str | None:
    """The corpus a `builtin` / `builtin:NAME` source names, or None for other sources."""
    if source == BUILTIN:
        return DEFAULT_CORPUS
    if source.startswith(BUILTIN + ":"):
        corpus = source.removeprefix(BUILTIN + ":")
        if corpus not in CORPORA:
            raise HfCompressError(f"unknown builtin corpus '{source}': use builtin or one of "
                                  + ", ".join(f"builtin:{c}" for c in CORPORA))
        return corpus
    return None


@functools.lru_cache(maxsize=8)
def _corpus_ids(tokenizer, corpus: str) -> list[int]:
    """Tokenized once per tokenizer and corpus (each split and source shares it)."""
    return tokenize_joined(tokenizer, corpus_texts(corpus))


def builtin_ids(tokenizer, corpus: str, split: str) -> list[int]:
    """The tokens of one split of a builtin corpus (for `mix`, each part's split in turn)."""
    ids = []
    for part in (MIX if corpus == "mix" else (corpus,)):
        tokens = _corpus_ids(tokenizer, part)
        start, end = SPLITS[split]
        ids += tokens[int(len(tokens) * start):int(len(tokens) * end)]
    return ids


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


def _hub_texts(source: TextSource, max_chars: int):
    """Stream just enough rows of a Hub dataset."""
    from datasets import load_dataset

    name, column = source.dataset, source.text_column
    try:
        stream = load_dataset(name, source.dataset_config, split=source.dataset_split, streaming=True,
                              revision=source.dataset_revision, token=source.token)
    except Exception as err:  # datasets raises many types for a missing or offline dataset
        raise HfCompressError(f"cannot load dataset '{name}': {first_line(err)}") from None
    texts, total = [], 0
    for row in stream:
        if column not in row:
            raise HfCompressError(f"dataset '{name}' has no column '{column}'")
        texts.append(row[column])
        total += len(row[column])
        if total >= max_chars:
            break
    return texts


def calibration_data(
    tokenizer,
    source: str | TextSource = BUILTIN,
    seq_len: int = 256,
    split: str = "calibration",
    max_windows: int | None = None,
) -> torch.Tensor:
    """Token windows of shape (n, seq_len) from `source` (a dataset name, or a TextSource to
    choose a Hub dataset's configuration, split, column, revision or token).

    `split` picks the calibration, validation or test part of a builtin corpus; other sources
    are used whole.
    """
    source = TextSource(source) if isinstance(source, str) else source
    if split not in SPLITS:
        raise HfCompressError(f"split must be one of {tuple(SPLITS)}, not '{split}'")
    if tokenizer is None:
        raise HfCompressError("the model has no tokenizer to turn text into tokens: save one beside its weights")
    name = source.dataset
    corpus = builtin_corpus(name)
    if corpus is not None:
        ids = builtin_ids(tokenizer, corpus, split)
    elif Path(name).is_file():
        ids = tokenize_joined(tokenizer, _local_texts(Path(name), source.text_column))
    elif name.endswith((".txt", ".jsonl", ".json", ".parquet")):
        raise HfCompressError(f"data file not found: {name}")
    else:  # a Hub dataset id, or a local dataset directory laid out like one
        max_chars = 8 * seq_len * (max_windows or 4096)  # ~4 characters a token, with margin
        ids = tokenize_joined(tokenizer, _hub_texts(source, max_chars))
    bos = leading_bos(tokenizer)
    width = seq_len - len(bos)  # text tokens a window
    n = len(ids) // width if width > 0 else 0
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise HfCompressError(
            f"'{name}' has {len(ids)} tokens, fewer than one window of {seq_len}"
        )
    windows = torch.tensor(ids[: n * width], dtype=torch.long).view(n, width)
    return torch.cat([torch.tensor(bos, dtype=torch.long).expand(n, len(bos)), windows], dim=1)


def held_aside(tokenizer, source: str | TextSource, seq_len: int, windows: int) -> tuple[torch.Tensor, str]:
    """The last `windows` windows of text kept out of calibration, and the split they come from: a
    builtin corpus' validation split, any other source's last windows (keep those out of the pass)."""
    name = source if isinstance(source, str) else source.dataset
    split = "validation" if builtin_corpus(name) else "calibration"
    return calibration_data(tokenizer, source, seq_len=seq_len, split=split)[-windows:], split


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
