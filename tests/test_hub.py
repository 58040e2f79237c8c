"""`push`: the directory is checked, the card says what the directory records, and nothing is
uploaded by a dry run or when the Hub cannot be reached (the tests run offline)."""

import json

import pytest
import yaml

from conftest import run_cli, tiny_data, tiny_model
from hf_compress import HfCompressError, acip, fold, load_model
from hf_compress.acip.compressible import FACTORS_FILE
from hf_compress.checkpoint import save_checkpoint
from hf_compress.hub import model_card


def card_metadata(card) -> dict:
    return yaml.safe_load(str(card).split("---")[1])


@pytest.fixture
def folded_dir(tmp_path, tokenizer):
    model = tiny_model()
    model.config.name_or_path = "some-org/tiny-llama"  # as if loaded from the Hub
    save_checkpoint(fold(model, ratio=0.5, layers=[1], show_progress=False), tokenizer, tmp_path / "folded")
    return tmp_path / "folded"


def test_dry_run_prints_the_card_and_uploads_nothing(monkeypatch, capsys, folded_dir):
    code, _, _ = run_cli(monkeypatch, capsys, "eval", folded_dir, "--max-windows", 2, "--seq-len", 32)
    assert code in (0, None)
    code, out, err = run_cli(monkeypatch, capsys, "push", folded_dir, "--repo-id", "me/tiny-folded", "--dry-run")
    assert code in (0, None) and "would push" in err and "dry run" in err
    metadata = card_metadata(out)
    assert metadata["base_model"] == "some-org/tiny-llama" and "fold" in metadata["tags"]
    results = json.loads((folded_dir / "eval_results.json").read_text())["results"][0]
    [entry] = metadata["model-index"]
    assert entry["name"] == "me/tiny-folded"
    assert entry["results"][0]["metrics"][0]["value"] == round(results["perplexity"], 4)
    assert 'from_pretrained("me/tiny-folded", trust_remote_code=True)' in out
    assert not (folded_dir / "README.md").exists()


def test_card_of_a_compressible_directory(tmp_path):
    acip(tiny_model(), tiny_data(), max_steps=4, batch_size=4, show_progress=False).save_pretrained(tmp_path / "c")
    card = str(model_card(tmp_path / "c", "me/tiny-acip"))
    assert "hf-compress materialize" in card and "base_model" not in card  # built from a config, no Hub id
    assert card_metadata(card)["tags"] == ["hf-compress", "acip"]
    (tmp_path / "c" / FACTORS_FILE).unlink()
    with pytest.raises(HfCompressError, match="not a complete compressible directory"):
        model_card(tmp_path / "c", "me/tiny-acip")


def test_a_directory_with_its_own_card_keeps_it(folded_dir):
    from hf_compress.hub import push

    (folded_dir / "README.md").write_text("# mine\n")
    plan = push(folded_dir, "me/tiny-folded", dry_run=True)
    assert plan["own_card"] and plan["card"] == "# mine\n" and plan["files"].count("README.md") == 1


def test_offline_push_fails_with_one_line(monkeypatch, capsys, folded_dir):
    code, _, err = run_cli(monkeypatch, capsys, "push", folded_dir, "--repo-id", "me/tiny-folded")
    assert code == 1 and "error: cannot push to me/tiny-folded" in err and "Traceback" not in err


@pytest.mark.parametrize("damage,message", [
    ("truncate", "incomplete or corrupt"), ("no_marker", "was not written by hf-compress"),
    ("bad_repo", "--repo-id must look like"),
])
def test_bad_directories_are_refused(monkeypatch, capsys, folded_dir, damage, message):
    repo = "me/tiny-folded"
    if damage == "truncate":
        weights = folded_dir / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "no_marker":
        config = json.loads((folded_dir / "config.json").read_text())
        del config["hf_compress"]
        (folded_dir / "config.json").write_text(json.dumps(config))
    else:
        repo = "not a repo id"
    code, _, err = run_cli(monkeypatch, capsys, "push", folded_dir, "--repo-id", repo, "--dry-run")
    assert code == 1 and message in err


def test_the_source_survives_a_compressible_directory(tmp_path):
    from hf_compress import CompressibleModel

    model = tiny_model()
    model.config.name_or_path = "some-org/tiny-llama"
    acip(model, tiny_data(), max_steps=4, batch_size=4, show_progress=False).save_pretrained(tmp_path / "c")
    small = CompressibleModel.from_pretrained(tmp_path / "c").materialize(0.8)
    assert small.config.hf_compress["source"] == "some-org/tiny-llama"


def test_the_source_survives_a_folded_checkpoint(tmp_path):
    model = tiny_model()
    model.config.name_or_path = "some-org/tiny-llama"
    save_checkpoint(fold(model, ratio=0.5, show_progress=False), None, tmp_path / "folded")
    reloaded = load_model(tmp_path / "folded")[0]  # its name_or_path is now a local path
    result = acip(reloaded, tiny_data(), max_steps=2, batch_size=4, show_progress=False)
    assert result.summary["source"] == "some-org/tiny-llama"
