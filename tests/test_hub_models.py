"""Reading models and datasets from the Hub: a revision and a token reach the real
huggingface_hub client (here answered by an in-process fake Hub), and what goes wrong, a gated
model or a download that drops, is one sentence."""

import json

from conftest import refused, ok


def test_a_model_loads_at_a_revision_with_a_token(hub, tiny_checkpoint, tmp_path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_checkpoint)
    config.num_hidden_layers = 1  # the older revision is another model
    older = tmp_path / "older"
    older.mkdir()
    for path in tiny_checkpoint.iterdir():
        if path.name != "model.safetensors":
            (older / path.name).write_bytes(path.read_bytes())
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(config).save_pretrained(older)
    hub.serve("some-org/tiny", tiny_checkpoint)
    hub.serve("some-org/tiny", older, revision="v1")
    latest = json.loads(ok("info", "some-org/tiny", "--json")[0])
    hub.requests.clear()
    pinned = json.loads(ok("info", "some-org/tiny", "--revision", "v1", "--token", "hf_mine", "--json")[0])
    assert len(pinned["layers"]) == len(latest["layers"]) // 2
    downloads = [r for r in hub.requests if "/resolve/" in r.url.path]
    assert downloads and all("/resolve/v1/" in r.url.path for r in downloads)
    assert all(r.headers["authorization"] == "Bearer hf_mine" for r in downloads)
    message = refused("info", "some-org/tiny", "--revision", "v2")
    assert "v2 is not a valid git identifier" in message and "offline" not in message


def test_a_gated_model_says_where_to_ask_for_access(hub, tiny_checkpoint):
    hub.serve("some-org/gated", tiny_checkpoint, gated=True)
    message = refused("info", "some-org/gated")
    assert "gated" in message and "https://huggingface.co/some-org/gated" in message
    assert "\n" not in message.strip()


def test_a_weight_download_that_drops_is_one_sentence(hub, tiny_checkpoint, tmp_path):
    hub.serve("some-org/tiny", tiny_checkpoint)
    hub.broken.add("model.safetensors")  # config and tokenizer arrive, the weights do not
    message = refused("quantize", "some-org/tiny", "--output", tmp_path / "q")
    assert message.startswith("error: cannot load model 'some-org/tiny': a download from the Hub failed") and "\n" not in message.strip()
    assert not (tmp_path / "q").exists()
