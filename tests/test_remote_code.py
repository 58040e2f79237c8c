"""A model that ships its own modeling code (config and model classes in the checkpoint, one file
importing the other) through every command with --trust-remote-code, refused in one sentence
without it, and its outputs reloaded by transformers alone."""

import json
import textwrap

import pytest
import torch

from conftest import COMMON, ok, refused, tiny_data
from test_architectures import reload_without_hf_compress
from test_compositions import SMALL_EVAL, SMALL_PASS

pytestmark = pytest.mark.slow

CONFIGURATION = '''
from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    model_type = "tiny_remote"
'''
MODELING = '''
from transformers import LlamaForCausalLM

from .configuration_tiny_remote import TinyRemoteConfig


class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig
'''
TRUST = "--trust-remote-code"


@pytest.fixture(scope="module")
def remote(tmp_path_factory, tokenizer):
    """A checkpoint directory as a Hub repo with custom code looks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("remote") / "tiny-remote"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**COMMON)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "configuration_tiny_remote.py").write_text(textwrap.dedent(CONFIGURATION))
    (path / "modeling_tiny_remote.py").write_text(textwrap.dedent(MODELING))
    config = json.loads((path / "config.json").read_text())
    config |= {"model_type": "tiny_remote", "architectures": ["TinyRemoteForCausalLM"],
               "auto_map": {"AutoConfig": "configuration_tiny_remote.TinyRemoteConfig",
                            "AutoModelForCausalLM": "modeling_tiny_remote.TinyRemoteForCausalLM"}}
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_refused_without_trust(remote, tmp_path):
    for args in (("compress", remote, "--output", tmp_path / "c"), ("plan", remote),
                 ("fold", remote, "--ratio", 0.5, "--output", tmp_path / "f"), ("info", remote)):
        assert "runs its own modeling code: pass --trust-remote-code" in refused(*args)
    assert list(tmp_path.iterdir()) == []


def test_every_command_with_trust_then_transformers_alone(remote, tmp_path):
    from hf_compress import CompressibleModel, load_model

    compressible, small, folded = tmp_path / "acip", tmp_path / "small", tmp_path / "folded"
    ok("plan", remote, TRUST)
    ok("compress", remote, "--output", compressible, *SMALL_PASS, TRUST)
    assert (compressible / "modeling_tiny_remote.py").is_file()  # the dense base keeps its code
    assert "runs its own modeling code" in refused("materialize", compressible,
                                                  "--size-ratio", 0.6, "--output", small)
    ok("info", compressible, TRUST)
    ok("eval", compressible, "--size-ratios", "0.6", *SMALL_EVAL, TRUST)
    ok("materialize", compressible, "--size-ratio", 0.6, "--output", small, TRUST)
    ok("fold", remote, "--ratio", 0.5, "--layers", "0=0.75,1", "--output", folded, TRUST)
    ok("quantize", small, "--method", "int8", "--output", tmp_path / "q", TRUST)
    for path in (small, folded):
        config = json.loads((path / "config.json").read_text())
        assert config["auto_map"]["AutoConfig"] == "configuration_tiny_remote.TinyRemoteConfig"  # the source's, kept
        assert config["hf_compress"]["base_code"] == "modeling_tiny_remote.TinyRemoteForCausalLM"
        assert "runs its own modeling code" in refused("info", path)
        report = json.loads(ok("info", path, "--json", TRUST)[0])
        assert report["architecture"] == "TinyRemoteForCausalLM"
    assert json.loads((small / "config.json").read_text())["hf_compress"]["ranks"]

    inputs = tiny_data(2, seed=5)
    expected = []
    for path in (small, folded):
        model = load_model(path, trust_remote_code=True)[0]
        with torch.no_grad():
            expected.append(model(inputs).logits)
    for got, want in zip(reload_without_hf_compress([small, folded], inputs, tmp_path), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    again = CompressibleModel.from_pretrained(compressible, trust_remote_code=True).materialize(0.6)
    with torch.no_grad():
        torch.testing.assert_close(again(inputs).logits, expected[0])
