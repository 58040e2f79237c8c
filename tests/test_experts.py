"""Mixture-of-experts models: every expert's matrices are layers like any other (one Linear per
expert and matrix), compressed, materialized, counted and quantized, and reloaded by transformers
alone; the router stays dense."""

import json
import warnings

import pytest
import torch
import transformers as T
from transformers import AutoModelForCausalLM

from conftest import COMMON, VOCAB, ok, tiny_data
from hf_compress import acip
from hf_compress.acip.compressible import CompressibleModel
from hf_compress.checkpoint import save_checkpoint
from hf_compress.formats import unfuse_experts
from hf_compress.layers import find_targets
from hf_compress.plan import meta_model, plan_memory
from test_architectures import reload_without_hf_compress

HEADS = dict(COMMON, head_dim=16)
MOE = dict(num_experts_per_tok=2)
FAMILIES = {
    "mixtral": lambda: T.MixtralConfig(**COMMON, num_local_experts=4, **MOE),
    "qwen2_moe": lambda: T.Qwen2MoeConfig(**COMMON, moe_intermediate_size=48, shared_expert_intermediate_size=96,
                                          num_experts=4, **MOE),  # a shared expert beside the routed ones
    "qwen3_moe": lambda: T.Qwen3MoeConfig(**HEADS, moe_intermediate_size=48, num_experts=4, **MOE),
    "olmoe": lambda: T.OlmoeConfig(**COMMON, num_experts=4, **MOE),
    "gpt_oss": lambda: T.GptOssConfig(**HEADS, num_local_experts=4, **MOE),  # transposed stacks, biases, clamped SwiGLU
    "deepseek_v3": lambda: T.DeepseekV3Config(  # MLA attention, a dense first block, shared experts
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, n_group=1,
        topk_group=1, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, max_position_embeddings=128, **MOE),
}


def build(family):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()


def non_embedding_params(model) -> int:
    embeddings = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in embeddings)


@pytest.mark.parametrize("family", FAMILIES)
def test_unfused_experts_compute_what_the_stacks_did(family):
    model, inputs = build(family), tiny_data(2, seed=5)
    with torch.no_grad():
        before = model(inputs).logits
        names = unfuse_experts(model)
        after = model(inputs).logits
    assert names and model.config.hf_compress["experts"] == sorted(names)
    assert not [n for n, p in model.named_parameters() if p.dim() > 2]
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    targets = find_targets(model)
    assert sum(".experts.up." in name for name in targets) == sum(".experts.down." in name for name in targets) > 0
    assert not [name for name in targets if name.endswith(".gate") or "router" in name]  # the router stays dense


@pytest.fixture(scope="module")
def materialized(tmp_path_factory):
    """Each family through compress -> compressible directory -> materialize 0.6 -> checkpoint, all
    read back from disk; with the logits each checkpoint must reproduce."""
    root, inputs, made = tmp_path_factory.mktemp("moe"), tiny_data(2, seed=5), {}
    for family in FAMILIES:
        model = build(family)
        dense = non_embedding_params(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            acip(model, tiny_data(8), max_steps=4, batch_size=4, stop_ratio=0.5,
                 show_progress=False).save_pretrained(root / family / "acip")
        assert not [w for w in caught if "experts' weights" in str(w.message)]
        compressible = CompressibleModel.from_pretrained(root / family / "acip")
        assert any(".experts.up." in name for name in compressible.layers)
        small = compressible.materialize(0.6)
        with torch.no_grad():
            logits = small(inputs).logits
        save_checkpoint(small, None, root / family / "m")
        made[family] = (root / family / "m", logits, non_embedding_params(small) / dense)
    return made, inputs


def test_every_family_materializes_to_a_smaller_model_transformers_reloads(materialized, tmp_path):
    made, inputs = materialized
    for family, (_, _, fraction) in made.items():
        assert fraction <= 0.65, f"{family} keeps {fraction:.3f} of its non-embedding parameters at 0.6"
    reloaded = reload_without_hf_compress([path for path, _, _ in made.values()], inputs, tmp_path)
    for got, (_, want, _) in zip(reloaded, made.values(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_the_memory_plan_counts_every_expert(tmp_path):
    build("mixtral").save_pretrained(tmp_path / "mixtral")
    net = meta_model(str(tmp_path / "mixtral"))
    experts = sum(p.numel() for n, p in net.named_parameters() if p.dim() > 2)
    plan = plan_memory(net)
    assert experts and net.config.hf_compress["experts"]
    assert sum(p.numel() for n, p in net.named_parameters() if ".experts." in n) == experts
    assert any(".experts.up." in name for name in find_targets(net)) and plan.peak_bytes > 4 * experts


@pytest.mark.slow
def test_the_cli_counts_and_quantizes_experts(tmp_path, tokenizer):
    """compress -> info -> materialize under a byte budget with nf4, on a Mixtral checkpoint on disk."""
    source = tmp_path / "mixtral"
    torch.manual_seed(0)
    config = T.MixtralConfig(**{**COMMON, "hidden_size": 128, "intermediate_size": 256}, num_local_experts=4, **MOE)
    AutoModelForCausalLM.from_config(config).save_pretrained(source)
    tokenizer.save_pretrained(source)
    ok("compress", source, "--output", tmp_path / "acip", "--max-steps", 4, "--seq-len", 32, "--batch-size", 4)
    sizes = json.loads(ok("info", tmp_path / "acip", "--json")[0])
    expert_weights = 2 * 4 * 3 * 128 * 256  # blocks x experts x (gate, up, down) x hidden x intermediate
    assert sizes["target_dense_params"] > expert_weights
    ok("materialize", tmp_path / "acip", "--max-size", "1MB", "--quantize", "nf4", "--output", tmp_path / "q")
    report = json.loads(ok("info", tmp_path / "q", "--json")[0])
    assert report["quantization"]["method"] == "nf4" and report["file_bytes"] <= 1_000_000
    ok("quantize", source, "--method", "nf4", "--output", tmp_path / "dense-nf4")  # a dense MoE: experts too
    for path in (tmp_path / "q", tmp_path / "dense-nf4"):
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
        linears = [m for name, m in model.named_modules() if ".experts.up." in name or ".experts.down." in name]
        assert any(type(m).__name__ == "Linear4bit" for m in linears), path
