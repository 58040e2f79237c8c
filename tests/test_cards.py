"""Model cards: every directory hf-compress writes has a README.md whose metadata huggingface_hub
parses (source, license, tags, eval results as model-index), with sizes against the source, and
`eval` refreshes it unless the user wrote their own. The template ships in the package."""

import json
import re
from importlib import resources
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from conftest import run_cli, tiny_data, tiny_model
from hf_compress import CompressibleModel, acip, fold
from hf_compress.cards import CARD_FILE, MARKER, write_card
from hf_compress.checkpoint import save_checkpoint
from hf_compress.loading import BUNDLED, DEMO, load_model

ROOT = Path(__file__).parent.parent


def card_of(path: Path) -> ModelCard:
    text = (path / CARD_FILE).read_text()
    assert MARKER in text
    return ModelCard(text)


def size_row(card: ModelCard, label: str) -> list[str]:
    [line] = [line for line in card.text.splitlines() if line.startswith(f"| {label} |")]
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def compressed(tmp_path, source: str, tokenizer=None):
    """A compressible directory of a tiny model loaded from `source`."""
    model = tiny_model()
    model.config.name_or_path = source
    result = acip(model, tiny_data(), max_steps=4, batch_size=4, tokenizer=tokenizer, show_progress=False)
    result.save_pretrained(tmp_path / "c")
    return tmp_path / "c"


def test_every_directory_written_has_a_card(tmp_path, tokenizer):
    compressible_dir = compressed(tmp_path, "some-org/tiny-llama")
    save_checkpoint(CompressibleModel.from_pretrained(compressible_dir).materialize(0.5), tokenizer, tmp_path / "m")
    model = tiny_model()
    save_checkpoint(fold(model, ratio=0.5, layers="all", show_progress=False), tokenizer, tmp_path / "f")

    compressible, materialized, folded = (card_of(tmp_path / name) for name in ("c", "m", "f"))
    assert compressible.data.tags == ["hf-compress", "acip"] and "hf-compress materialize c" in compressible.text
    assert compressible.data.base_model == "some-org/tiny-llama" and compressible.data.license is None  # offline
    # auto_map (factorized layers) needs the shipped modeling file; a uniform fold is the plain architecture
    assert 'from_pretrained("path/to/m", trust_remote_code=True)' in materialized.text
    assert 'from_pretrained("path/to/f")' in folded.text and "trust_remote_code" not in folded.text
    assert materialized.data.tags == ["hf-compress", "acip"] and materialized.data.base_model == "some-org/tiny-llama"
    assert '"objective": "saliency"' in materialized.text  # which pass objective ranked the values
    assert folded.data.tags == ["hf-compress", "fold"] and "folding is data-free" in folded.text


def test_the_demo_source_is_its_hub_model(tmp_path):
    model = tiny_model()
    model.config.name_or_path = "demo"  # what load_model("demo") records
    save_checkpoint(fold(model, ratio=0.5, layers=[1], show_progress=False), None, tmp_path / "f")
    for path in (tmp_path / "f", compressed(tmp_path, "demo")):
        card = card_of(path)
        assert card.data.base_model == BUNDLED[DEMO].origin["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert card.data.license == "apache-2.0" and "Q4_1 GGUF" in card.text


def test_sizes_against_the_source(tmp_path):
    model = tiny_model()
    source_params = sum(p.numel() for p in model.parameters())
    save_checkpoint(fold(model, ratio=0.5, layers=[1], show_progress=False), None, tmp_path / "f")
    card = card_of(tmp_path / "f")
    params = sum(p.numel() for p in load_model(tmp_path / "f")[0].parameters())
    weights = sum(f.stat().st_size for f in (tmp_path / "f").glob("*.safetensors"))
    assert size_row(card, "source model")[0] == f"{source_params:,}"
    assert size_row(card, "this model") == [f"{params:,}", f"{weights / 2**20:,.1f} MiB"]
    assert size_row(card, "ratio")[0] == f"{params / source_params:.3f}"

    config = json.loads((tmp_path / "f" / "config.json").read_text())
    del config["hf_compress"]["source_params"], config["hf_compress"]["source_bytes"]  # older checkpoints
    (tmp_path / "f" / "config.json").write_text(json.dumps(config))
    card = ModelCard(write_card(tmp_path / "f").read_text())
    assert size_row(card, "source model") == ["not recorded", "not recorded"] and "| ratio |" not in card.text


def test_quantized_checkpoint(tmp_path):
    from hf_compress import quantize

    save_checkpoint(quantize(tiny_model(), "nf4"), None, tmp_path / "q")
    card = card_of(tmp_path / "q")
    assert card.data.tags == ["hf-compress", "bitsandbytes", "nf4"]
    assert "bitsandbytes `nf4`. Left unquantized: `lm_head`" in card.text and "pip install bitsandbytes" in card.text


def test_eval_refreshes_the_card_unless_the_user_wrote_it(tmp_path, tokenizer):
    model = tiny_model()
    save_checkpoint(fold(model, ratio=0.5, layers=[1], show_progress=False), tokenizer, tmp_path / "f")
    code, _, _ = run_cli("eval", tmp_path / "f", "--max-windows", 2, "--seq-len", 32)
    assert code in (0, None)
    card = card_of(tmp_path / "f")
    perplexity = json.loads((tmp_path / "f" / "eval_results.json").read_text())["results"][0]["perplexity"]
    [result] = card.data.eval_results  # model-index parsed back by huggingface_hub
    assert card.data.model_name == "f" and result.metric_type == "perplexity"
    assert result.metric_value == round(perplexity, 4) and "## Evaluation" in card.text

    (tmp_path / "f" / CARD_FILE).write_text("# my own card\n")
    run_cli("eval", tmp_path / "f", "--max-windows", 2, "--seq-len", 32)
    assert (tmp_path / "f" / CARD_FILE).read_text() == "# my own card\n"


def test_a_sweep_is_a_table_not_model_index(tmp_path, tokenizer):
    path = compressed(tmp_path, "some-org/tiny-llama", tokenizer)
    code, _, _ = run_cli("eval", path, "--size-ratios", "0.5,1.0", "--max-windows", 2,
                         "--seq-len", 32)
    assert code in (0, None)
    card = card_of(path)
    assert card.data.eval_results is None and "| 1.000 |" in card.text
    assert re.search(r"\| 0\.(49\d|500) \|", card.text)  # at most the asked size (whole channels: a little under)


def test_the_template_ships_in_the_package():
    """Packages are listed by hand in pyproject.toml (the template folder is mapped into the
    package): every subpackage must be there, and the template must be a package resource."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "hf_compress").rglob("__init__.py")}
    assert on_disk | {"hf_compress.model_cards"} == set(setuptools["packages"])
    assert setuptools["package-dir"]["hf_compress.model_cards"] == "model_cards"
    template = resources.files("hf_compress.model_cards").joinpath("template.md").read_text()
    assert template == (ROOT / "model_cards" / "template.md").read_text()
