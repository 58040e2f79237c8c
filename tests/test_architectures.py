"""Every common architecture through compress, materialize, fold, prune and a reload in a process
where hf_compress cannot be imported; what cannot be done is one clear sentence."""

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import transformers as T
from transformers import AutoModelForCausalLM

from conftest import COMMON, CONFIGS, VOCAB, tiny_data
from hf_compress import HfCompressError, acip, fold, prune
from hf_compress.checkpoint import save_checkpoint
from hf_compress.layers import find_targets

pytestmark = pytest.mark.slow

HEADS = dict(COMMON, head_dim=16)
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=28,
              patch_size=14)
MOE = dict(num_experts_per_tok=2)
MATRIX = {
    **CONFIGS,  # llama, qwen2, mistral, phi3, gpt2
    "qwen3": lambda: T.Qwen3Config(**HEADS),  # per-head q/k norms
    "gemma2": lambda: T.Gemma2Config(**HEADS),
    "gemma3_text": lambda: T.Gemma3TextConfig(**HEADS),
    "gemma3": lambda: T.Gemma3Config(text_config=HEADS, vision_config=VISION),  # composite: its text part
    "opt": lambda: T.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64),
    "gpt_neox": lambda: T.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=128),
    "falcon": lambda: T.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     new_decoder_architecture=True, num_kv_heads=2),
    "olmo2": lambda: T.Olmo2Config(**COMMON),  # q/k norms across all heads
    "mixtral": lambda: T.MixtralConfig(**COMMON, num_local_experts=4, **MOE),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(**HEADS, moe_intermediate_size=48, num_experts=4, **MOE),
}
# What folding and pruning cannot do, by architecture: the start of the one-sentence error.
NO_HEAD_FOLDING = {
    "gpt2": "cannot {verb} attention heads of GPT2Block",
    "opt": "cannot {verb} attention heads of OPTDecoderLayer",
    "gpt_neox": "cannot {verb} attention heads of GPTNeoXLayer",
    "falcon": "cannot {verb} attention heads of FalconDecoderLayer",
    "olmo2": "cannot {verb} attention heads of Olmo2DecoderLayer: its q_norm/k_norm normalize across all heads",
}


def build(arch):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(MATRIX[arch]()).eval()


def reload_without_hf_compress(directories, inputs, tmp_path):
    """Logits of each checkpoint loaded by transformers alone (remote code allowed)."""
    torch.save(inputs, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["hf_compress"] = None
        import torch
        from transformers import AutoModelForCausalLM
        x = torch.load("{tmp_path / 'x.pt'}")
        out = []
        for path in {[str(d) for d in directories]!r}:
            model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
            with torch.no_grad():
                out.append(model(x).logits)
        torch.save(out, "{tmp_path / 'y.pt'}")
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return torch.load(tmp_path / "y.pt")


@pytest.mark.parametrize("arch", MATRIX)
def test_architecture(arch, tmp_path):
    data, inputs = tiny_data(8), tiny_data(2, seed=5)
    model = build(arch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = acip(model, data, max_steps=4, batch_size=4, stop_ratio=0.5, show_progress=False)
    assert not any("experts' weights" in str(w.message) for w in caught)  # experts are compressed too
    assert "uncompressed_expert_params" not in result.summary
    small, factorized = result.materialize(0.6), result.materialize(0.6, structure="svd")
    assert small.config.hf_compress["size_ratio"] <= 0.6 and factorized.config.hf_compress["ranks"]
    expected = [small(inputs).logits, factorized(inputs).logits]
    save_checkpoint(small, None, tmp_path / "materialized")
    save_checkpoint(factorized, None, tmp_path / "factorized")
    directories = [tmp_path / "materialized", tmp_path / "factorized"]

    shrinks = {"folded": (fold, dict(verb="fold", doing="folding")),
               "pruned": (lambda model, **kw: prune(model, data, **kw), dict(verb="prune", doing="pruning"))}
    for name, (shrink, words) in shrinks.items():
        model = build(arch)  # (mixtures of experts: channels inside every expert)
        if arch in NO_HEAD_FOLDING:
            with pytest.raises(HfCompressError, match=NO_HEAD_FOLDING[arch].format(**words)):
                shrink(build(arch), layers="all", ratio=0.5, heads_ratio=0.5, show_progress=False)
            shrink(model, layers="all", ratio=0.5, show_progress=False)
        else:
            shrink(model, layers="all", ratio=0.5, heads_ratio=0.5, show_progress=False)
        assert model.config.hf_compress["size_ratio"] < 0.8
        assert "auto_map" not in model.config.to_dict()  # a uniform shrink is the plain architecture
        expected.append(model(inputs).logits)
        save_checkpoint(model, None, tmp_path / name)
        directories.append(tmp_path / name)

    for got, want in zip(reload_without_hf_compress(directories, inputs, tmp_path), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_composite_model_targets_its_language_model_only():
    names = find_targets(build("gemma3"))
    assert names and all(name.startswith("model.language_model.layers.") for name in names)


def test_source_auto_map_is_kept(tmp_path):
    """A source with remote-code entries of its own keeps them beside ours."""
    model = build("llama")
    model.config.auto_map = {"AutoConfig": "configuration_custom.CustomConfig"}
    small = acip(model, tiny_data(8), max_steps=2, batch_size=4, show_progress=False).materialize(0.5)
    assert small.config.auto_map["AutoConfig"] == "configuration_custom.CustomConfig"
    assert small.config.auto_map["AutoModelForCausalLM"].endswith("HfCompressForCausalLM")
