"""bitsandbytes quantization composed with ACIP and folding: real Linear4bit / Linear8bitLt layers,
checkpoints that reload (with and without hf_compress), byte accounting and byte budgets."""

import copy
import subprocess
import sys
import textwrap

import bitsandbytes as bnb
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from conftest import tiny_data, tiny_model
from hf_compress import HfCompressError, acip, fold, load_model, quantize
from hf_compress.checkpoint import save_checkpoint
from hf_compress.formats import disk_bytes, size_report
from hf_compress.layers import stored_tensors, tensor_bytes
from hf_compress.quantize import QUANT_STATE_BYTES, width_multiple

METHODS = ["nf4", "fp4", "int8"]


def wide_model(seed: int = 0, tied: bool = True):
    """Small, but wide enough for ranks and widths in multiples of 64."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=320, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def compressible():
    # No LoRA: stacked beside the kept values and rounded to nf4's 64, it alone is 0.43 of this tiny model.
    return acip(wide_model(), tiny_data(), max_steps=8, batch_size=4, lora_rank=0, show_progress=False)


def bnb_layers(model):
    return [m for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


def assert_fits_cpu_kernel(model):
    """What bitsandbytes does to every 4-bit weight on CPUs with AVX512-BF16 before a matmul."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = copy.deepcopy(module.weight.quant_state)
            bnb.functional._convert_weight_packed_for_cpu(module.weight.data.clone(), state)


@pytest.mark.parametrize("method", METHODS)
def test_quantize_a_dense_model(method):
    model = wide_model()
    quantized = quantize(model, method)
    assert bnb_layers(quantized) and type(quantized.lm_head) is torch.nn.Linear  # the head stays float
    data = tiny_data(2)
    reference, logits = model(data).logits, quantized(data).logits
    assert logits.isfinite().all()
    assert (logits - reference).abs().mean() < 0.3 * reference.abs().mean()  # broken: ~1x
    assert tensor_bytes(quantized) < 0.6 * tensor_bytes(model)
    assert size_report(quantized)["model_params"] == sum(p.numel() for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_materialized_quantized_checkpoint_reloads_everywhere(compressible, method, tmp_path):
    small = compressible.materialize(0.5, quantize=method)
    assert bnb_layers(small) and small.config.hf_compress["ranks"]
    multiple = width_multiple(method)
    assert all(rank % multiple == 0 for rank in small.config.hf_compress["ranks"].values())
    assert_fits_cpu_kernel(small)
    save_checkpoint(small, None, tmp_path / "m")
    data = tiny_data(2)
    ours, _ = load_model(tmp_path / "m")
    assert size_report(ours)["model_bytes"] == tensor_bytes(small)
    with torch.no_grad():  # inference, as in the fresh process: on AVX512-BF16 CPUs bitsandbytes repacks then
        expected = small.eval()(data).logits
        torch.testing.assert_close(ours.eval()(data).logits, expected, rtol=0, atol=0)
    torch.save(data, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["hf_compress"] = None
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained("{tmp_path / 'm'}", trust_remote_code=True).eval()
        assert model.config.quantization_config.quant_method == "bitsandbytes"
        with torch.no_grad():
            torch.save(model(torch.load("{tmp_path / 'x.pt'}")).logits, "{tmp_path / 'y.pt'}")
            model.generate(torch.load("{tmp_path / 'x.pt'}")[:1, :4], max_new_tokens=3, do_sample=False)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, capture_output=True)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, rtol=0, atol=0)


def weight_files(model, directory) -> int:
    save_checkpoint(model, None, directory)
    return disk_bytes(directory)[0]


@pytest.mark.parametrize("method", [None, *METHODS])
def test_byte_estimate_bounds_the_files_on_disk(compressible, method, tmp_path):
    for ratio in (0.3, 0.7, 1.0):
        plan = compressible.plan_at(ratio, width_multiple(method))
        model = compressible.materialize(plan=plan, quantize=method)
        actual = weight_files(model, tmp_path / str(ratio))
        estimate = compressible.checkpoint_bytes(plan, method)
        tensors = len(stored_tensors(model))
        four_bit_layers = 2 * len(plan.ranks) if method in ("nf4", "fp4") else 0
        # The bound counts every offset at full width and the 4-bit state at its longest.
        assert actual <= estimate <= actual + tensors * 2 * len(str(actual)) + four_bit_layers * QUANT_STATE_BYTES
        assert actual > tensor_bytes(model)  # the headers are counted


@pytest.mark.parametrize("method", [None, "int8", "nf4"])
def test_byte_budget_bounds_the_files_on_disk(compressible, method, tmp_path):
    full = compressible.checkpoint_bytes(compressible.plan_at(1.0), method)
    for fraction in (0.5, 0.7, 0.9):
        budget = int(fraction * full)
        written = weight_files(compressible.materialize(max_bytes=budget, quantize=method), tmp_path / str(fraction))
        assert 0.9 * budget < written <= budget
    plan = compressible.plan_within(budget, method)
    one_more = compressible.plan_within(int(1.15 * budget), method)
    assert compressible.checkpoint_bytes(one_more, method) > budget  # a larger model would not fit
    with pytest.raises(HfCompressError, match="below the smallest model"):
        compressible.materialize(max_bytes=1000, quantize=method)
    assert sum(plan.ranks.values()) <= sum(one_more.ranks.values())
    assert sum(plan.kept.values()) <= sum(one_more.kept.values())


def test_fold_with_quantization_rounds_widths_for_the_kernel(tmp_path):
    folded = fold(wide_model(), ratio=0.7, layers="all", quantize="nf4", show_progress=False)
    assert folded.config.intermediate_size == 192  # 224 kept channels rounded down to a multiple of 64
    assert folded.config.quantization_config.llm_int8_skip_modules == ["lm_head"]
    assert_fits_cpu_kernel(folded)
    save_checkpoint(folded, None, tmp_path / "f")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["hf_compress"] = None
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained("{tmp_path / 'f'}")
        print(type(model.model.layers[0].mlp.up_proj).__name__)
    """)
    done = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    assert done.stdout.strip() == "Linear4bit"


def test_widths_the_kernel_cannot_pack_stay_float():
    model = fold(tiny_model(), ratio=0.75, layers=[1], show_progress=False)  # 72 channels in block 1
    quantized = quantize(model, "nf4")
    skipped = quantized.config.quantization_config.llm_int8_skip_modules
    assert "model.layers.1.mlp.down_proj" in skipped and "model.layers.0.mlp.gate_proj" not in skipped
    assert_fits_cpu_kernel(quantized)
    assert quantized(tiny_data(2)).logits.isfinite().all()


def test_quantize_head_of_an_untied_model():
    quantized = quantize(wide_model(tied=False), "int8", quantize_head=True)
    assert isinstance(quantized.lm_head, bnb.nn.Linear8bitLt)
    with pytest.raises(HfCompressError, match="shares its weights with the input embeddings"):
        quantize(wide_model(tied=True), "nf4", quantize_head=True)


def test_quantized_models_are_refused_where_dense_weights_are_needed():
    quantized = quantize(wide_model(), "nf4")
    with pytest.raises(HfCompressError, match="already quantized"):
        quantize(quantized, "int8")
    with pytest.raises(HfCompressError, match="cannot fold a quantized model"):
        fold(quantized, ratio=0.5, show_progress=False)
    with pytest.raises(HfCompressError, match="cannot compress a quantized model"):
        acip(quantized, tiny_data(), max_steps=2, batch_size=4, show_progress=False)
    with pytest.raises(HfCompressError, match="quantization must be one of"):
        quantize(wide_model(), "int4")


def test_bfloat16_pass_keeps_masks_in_float32():
    model = wide_model().to(torch.bfloat16)
    result = acip(model, tiny_data(), max_steps=4, batch_size=4, show_progress=False)
    assert all(f.score.dtype == torch.float32 for f in result.layers.values())
    small = result.materialize(0.6)
    assert small.dtype == torch.bfloat16 and small(tiny_data(2)).logits.isfinite().all()
    quantized = result.materialize(0.6, quantize="nf4")
    assert quantized.config.quantization_config.bnb_4bit_compute_dtype == torch.bfloat16
