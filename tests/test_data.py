"""Calibration data from every source, the builtin split, and its errors."""

import copy
import json

import pytest
import torch

from hf_compress import HfCompressError, TextSource, calibration_data
from hf_compress.data import CORPORA, DEFAULT_CORPUS, MIX, SPLITS, WIKI_CHARS, builtin_text, corpus_texts


@pytest.mark.parametrize("corpus", CORPORA)
def test_builtin_splits_are_deterministic_and_disjoint(tokenizer, corpus):
    source = f"builtin:{corpus}"
    splits = {split: calibration_data(tokenizer, source, seq_len=64, split=split) for split in SPLITS}
    assert torch.equal(splits["calibration"], calibration_data(tokenizer, source, seq_len=64))
    assert 6 < len(splits["calibration"]) / len(splits["test"]) < 10  # 80 / 10 / 10 by tokens
    assert 0.8 < len(splits["test"]) / len(splits["validation"]) < 1.25
    windows = {split: {tuple(w.tolist()) for w in data} for split, data in splits.items()}
    assert not windows["calibration"] & windows["test"] and not windows["test"] & windows["validation"]
    assert not windows["calibration"] & windows["validation"]


def test_builtin_is_the_default_corpus_and_the_mix_holds_its_parts(tokenizer):
    assert torch.equal(calibration_data(tokenizer, "builtin", seq_len=64),
                       calibration_data(tokenizer, f"builtin:{DEFAULT_CORPUS}", seq_len=64))
    parts = sum(len(calibration_data(tokenizer, f"builtin:{c}", seq_len=64, split="test")) for c in MIX)
    assert abs(len(calibration_data(tokenizer, "builtin:mix", seq_len=64, split="test")) - parts) <= len(MIX)
    news = {tuple(w.tolist()) for w in calibration_data(tokenizer, "builtin:news", seq_len=64)}
    assert not news & {tuple(w.tolist()) for w in calibration_data(tokenizer, "builtin:mix", seq_len=64)}


def test_builtin_corpora_are_real_text():
    assert len(builtin_text()) > 400_000
    assert sum(map(len, corpus_texts("news"))) > 300_000 and len(corpus_texts("news")) > 250
    wiki = corpus_texts("wiki")
    assert sum(map(len, wiki)) > WIKI_CHARS and "{{" not in "".join(wiki) and "[[" not in "".join(wiki)


def test_unknown_builtin_corpus_and_split_are_errors(tokenizer):
    with pytest.raises(HfCompressError, match="unknown builtin corpus 'builtin:poetry'"):
        calibration_data(tokenizer, "builtin:poetry")
    with pytest.raises(HfCompressError, match="split must be one of"):
        calibration_data(tokenizer, "builtin", split="heldout")


def test_max_windows(tokenizer):
    assert calibration_data(tokenizer, "builtin", seq_len=32, max_windows=5).shape == (5, 32)


def test_local_files(tokenizer, tmp_path):
    text = builtin_text()[:20_000]
    (tmp_path / "a.txt").write_text(text)
    rows = [{"body": chunk} for chunk in text.split("\n\n") if chunk]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    from_txt = calibration_data(tokenizer, str(tmp_path / "a.txt"), seq_len=16)
    from_jsonl = calibration_data(tokenizer, TextSource(str(tmp_path / "a.jsonl"), text_column="body"), seq_len=16)
    from_parquet = calibration_data(tokenizer, TextSource(str(tmp_path / "a.parquet"), text_column="body"), seq_len=16)
    assert len(from_txt) > 50
    assert torch.equal(from_jsonl, from_parquet)
    with pytest.raises(HfCompressError, match="no column 'text'"):
        calibration_data(tokenizer, str(tmp_path / "a.jsonl"), seq_len=16)


def test_too_short_is_an_error(tokenizer, tmp_path):
    (tmp_path / "short.txt").write_text("only a few words")
    with pytest.raises(HfCompressError, match="fewer than one window"):
        calibration_data(tokenizer, str(tmp_path / "short.txt"), seq_len=64)


def test_missing_sources_are_errors(tokenizer, tmp_path):
    with pytest.raises(HfCompressError, match="not found"):
        calibration_data(tokenizer, str(tmp_path / "nope.txt"))
    with pytest.raises(HfCompressError, match="unsupported data file"):
        (tmp_path / "x.csv").write_text("a,b")
        calibration_data(tokenizer, str(tmp_path / "x.csv"))
    with pytest.raises(HfCompressError, match="cannot load dataset 'no-such-user/no-such-dataset'"):
        calibration_data(tokenizer, "no-such-user/no-such-dataset")


def test_hub_dataset_path_with_a_local_stand_in(tokenizer, tmp_path, monkeypatch):
    """The streamed Hub code path, offline: a directory laid out like a dataset repository; the
    configuration, split, revision and token reach `datasets.load_dataset`."""
    import datasets

    calls, real = [], datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: calls.append((args, kwargs)) or real(
        *args, **{k: v for k, v in kwargs.items() if k not in ("revision", "token")}))

    repo = tmp_path / "user-dataset" / "data"
    repo.mkdir(parents=True)
    rows = [{"content": chunk} for chunk in builtin_text()[:30_000].split("\n\n") if chunk]
    datasets.Dataset.from_list(rows).to_parquet(str(repo / "train-00000-of-00001.parquet"))
    source = TextSource(str(tmp_path / "user-dataset"), text_column="content", dataset_split="train",
                        dataset_revision="v1", token="hf_mine")
    windows = calibration_data(tokenizer, source, seq_len=16, max_windows=20)
    assert windows.shape == (20, 16)
    [(args, kwargs)] = calls
    assert args == (str(tmp_path / "user-dataset"), None) and kwargs == {
        "split": "train", "streaming": True, "revision": "v1", "token": "hf_mine"}


def test_windows_open_with_bos_when_the_tokenizer_adds_it(tokenizer):
    """Llama / Gemma tokenizers start every text with BOS, so every window does too."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    eos = tokenizer.eos_token_id
    backend.post_processor = processors.TemplateProcessing(single="<eos> $A", special_tokens=[("<eos>", eos)])
    with_bos = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>",
                                       bos_token="<eos>")
    plain = calibration_data(tokenizer, "builtin", seq_len=32, max_windows=4)
    windows = calibration_data(with_bos, "builtin", seq_len=32, max_windows=4)
    assert windows.shape == (4, 32) and (windows[:, 0] == eos).all()
    assert torch.equal(windows[0, 1:], plain.flatten()[:31])  # the text continues across windows
    assert torch.equal(windows[1, 1:], plain.flatten()[31:62])
