"""Mixture-of-experts models: every expert's matrices are layers like any other (one Linear per
expert and matrix), compressed, materialized, counted and quantized, and reloaded by transformers
alone; the router stays dense. Fold and prune keep fewer experts in the same architecture."""

import json
import warnings

import pytest
import torch
import transformers as T
from transformers import AutoModelForCausalLM

from conftest import COMMON, VOCAB, ok, tiny_data, tiny_model
from hf_compress import HfCompressError, acip, fold, prune
from hf_compress.acip.compressible import CompressibleModel
from hf_compress.checkpoint import save_checkpoint
from hf_compress.formats import unfuse_experts
from hf_compress.layers import find_targets
from hf_compress.plan import meta_model, plan_memory
from test_architectures import reload_without_hf_compress
from test_compositions import check_consumers

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
    """fold to fewer experts -> compress -> info -> materialize (under a byte budget with nf4; at
    0.6 then quantize int8) -> eval / info / push, and quantize of the dense MoE, on a Mixtral
    checkpoint on disk."""
    source = tmp_path / "mixtral"
    torch.manual_seed(0)
    config = T.MixtralConfig(**{**COMMON, "hidden_size": 128, "intermediate_size": 256}, num_local_experts=4, **MOE)
    AutoModelForCausalLM.from_config(config).save_pretrained(source)
    tokenizer.save_pretrained(source)
    ok("fold", source, "--ratio", 1, "--experts-ratio", 0.5, "--layers", "all", "--output", tmp_path / "f")
    assert json.loads((tmp_path / "f" / "config.json").read_text())["num_local_experts"] == 2
    ok("compress", tmp_path / "f", "--output", tmp_path / "acip", "--max-steps", 4, "--seq-len", 32,
       "--batch-size", 4)
    sizes = json.loads(ok("info", tmp_path / "acip", "--json")[0])
    expert_weights = 2 * 2 * 3 * 128 * 256  # blocks x experts x (gate, up, down) x hidden x intermediate
    assert sizes["target_dense_params"] > expert_weights
    ok("materialize", tmp_path / "acip", "--max-size", "1MB", "--quantize", "nf4", "--output", tmp_path / "q")
    report = json.loads(ok("info", tmp_path / "q", "--json")[0])
    assert report["quantization"]["method"] == "nf4" and report["file_bytes"] <= 1_000_000
    check_consumers(tmp_path / "q", tmp_path, quantized=True)
    ok("materialize", tmp_path / "acip", "--size-ratio", 0.6, "--output", tmp_path / "m")
    ok("quantize", tmp_path / "m", "--method", "int8", "--output", tmp_path / "m-int8")
    check_consumers(tmp_path / "m-int8", tmp_path, quantized=True)
    ok("quantize", source, "--method", "nf4", "--output", tmp_path / "dense-nf4")  # a dense MoE: experts too
    for path in (tmp_path / "q", tmp_path / "dense-nf4"):
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
        linears = [m for name, m in model.named_modules() if ".experts.up." in name or ".experts.down." in name]
        assert any(type(m).__name__ == "Linear4bit" for m in linears), path


# --- fewer experts, same architecture ---------------------------------------------------------------


def duplicated_mixtral():
    """Top-1 Mixtral whose experts 2 and 3 copy experts 0 and 1 (weights and router rows)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(T.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=1))
    with torch.no_grad():
        for block in model.model.layers:
            moe = block.mlp
            for tensor in (moe.experts.gate_up_proj, moe.experts.down_proj, moe.gate.weight):
                tensor[2:] = tensor[:2]
    return model.eval()


def test_fold_merges_duplicated_experts_back_exactly(tmp_path):
    model, inputs = duplicated_mixtral(), tiny_data(2, seed=5)
    with torch.no_grad():
        before = model(inputs).logits
    fold(model, ratio=1.0, experts_ratio=0.5, layers="all", show_progress=False)
    assert model.config.num_local_experts == 2 and model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 2
    assert model.config.hf_compress["expert_count"] == {"before": 4, "after": 2}
    assert 0.5 < model.config.hf_compress["size_ratio"] < 0.6  # the experts hold most of the targeted weights
    with torch.no_grad():
        torch.testing.assert_close(model(inputs).logits, before, rtol=0, atol=1e-5)
    save_checkpoint(model, None, tmp_path / "folded")
    assert "auto_map" not in json.loads((tmp_path / "folded" / "config.json").read_text())
    (reloaded,) = reload_without_hf_compress([tmp_path / "folded"], inputs, tmp_path)
    torch.testing.assert_close(reloaded, before, rtol=1e-4, atol=1e-4)


def test_prune_keeps_the_experts_that_carry_the_most_output():
    model = build("mixtral")
    with torch.no_grad():
        for block in model.model.layers:
            block.mlp.experts.down_proj[[0, 2]] *= 1e-3  # experts 0 and 2 hardly change the output
        kept = [(b.mlp.experts.gate_up_proj[[1, 3]].clone(), b.mlp.gate.weight[[1, 3]].clone())
                for b in model.model.layers]
    prune(model, tiny_data(8), ratio=1.0, experts_ratio=0.5, show_progress=False)
    for block, (stacks, router) in zip(model.model.layers, kept):
        torch.testing.assert_close(block.mlp.experts.gate_up_proj, stacks)
        torch.testing.assert_close(block.mlp.gate.weight, router)
    assert block.mlp.gate.num_experts == block.mlp.experts.num_experts == 2


SHARED_EXPERTS = ("qwen2_moe", "deepseek_v3")  # their channels stay: whole experts only


def test_every_family_folds_and_prunes_experts_for_plain_transformers(tmp_path):
    """Fewer experts, with half the channels of each one where the family allows, in the same
    architecture; and channels of one block's experts only, in per-layer shapes (remote code)."""
    inputs, directories, expected = tiny_data(2, seed=5), [], []
    for family in FAMILIES:
        ratio = 1.0 if family in SHARED_EXPERTS else 0.5
        shrinks = {"fold": lambda m: fold(m, ratio=ratio, experts_ratio=0.5, layers="all", show_progress=False),
                   "prune": lambda m: prune(m, tiny_data(8), ratio=ratio, experts_ratio=0.5, show_progress=False)}
        if family not in SHARED_EXPERTS:
            shrinks["one-block"] = lambda m: fold(m, ratio=0.5, layers=[1], show_progress=False)
        for name, shrink in shrinks.items():
            model = build(family)
            shrink(model)
            with torch.no_grad():
                expected.append(model(inputs).logits)
            save_checkpoint(model, None, tmp_path / family / name)
            config = json.loads((tmp_path / family / name / "config.json").read_text())
            assert ("auto_map" in config) == (name == "one-block"), (family, name)
            assert model.config.hf_compress["size_ratio"] < 0.85, (family, name)
            directories.append(tmp_path / family / name)
    for got, want in zip(reload_without_hf_compress(directories, inputs, tmp_path), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family,call,message", [
    ("mixtral", lambda m: fold(m, ratio=1.0, experts_ratio=0.25, show_progress=False),
     "keeps 1 experts per layer, fewer than the 2 each token is routed to"),
    ("mixtral", lambda m: prune(m, None, ratio=1.0, experts_ratio=0.5, method="magnitude", show_progress=False),
     "magnitude selection cannot choose experts"),
    ("mixtral", lambda m: fold(m, ratio=0.5, experts_ratio=0.5, show_progress=False),
     "folding the channels of experts needs a fixed schedule"),
    ("qwen2_moe", lambda m: prune(m, tiny_data(8), ratio=0.5, layers="all", show_progress=False),
     "cannot prune the channels of Qwen2MoeSparseMoeBlock's experts beside its shared_expert/shared_expert_gate"),
])
def test_what_fewer_experts_cannot_do_says_why(family, call, message):
    model = build(family)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(HfCompressError, match=message):
        call(model)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())  # nothing changed


def test_experts_ratio_needs_experts():
    with pytest.raises(HfCompressError, match="--experts-ratio needs a mixture-of-experts model"):
        fold(tiny_model(), ratio=1.0, experts_ratio=0.5, show_progress=False)
