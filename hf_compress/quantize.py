"""bitsandbytes quantization of any model hf-compress makes: dense, folded or materialized.

The model goes through transformers' own bitsandbytes loader (saved to a temporary directory and
loaded back with a `BitsAndBytesConfig`), so the result is exactly what
`AutoModelForCausalLM.from_pretrained(..., quantization_config=...)` gives: its Linear layers,
the factor Linears of factorized layers included, become `Linear4bit` / `Linear8bitLt`, and
`save_pretrained` writes the `quantization_config` that reloads it.

bitsandbytes' CPU 4-bit kernel (on CPUs with AVX512-BF16) repacks weights in blocks of 32 output
rows and 64 inputs and fails on other widths. Ranks and folded widths are therefore rounded to
multiples of 64 when 4-bit quantization is asked for (`width_multiple`), and any Linear that still
does not fit stays in its float dtype (listed in `llm_int8_skip_modules`) instead of failing.
"""

from __future__ import annotations

import logging
import math
import tempfile

import torch
from torch import nn
from transformers import BitsAndBytesConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from .errors import HfCompressError
from .formats import mark_compressed, source_of, source_sizes, unfuse_experts
from .layers import StoredTensor, layer_shape
from .offload import input_device

METHODS = ("nf4", "fp4", "int8")
FOUR_BIT_BLOCK = 64  # values per absmax scale, and the input block of the CPU kernel
FOUR_BIT_ROWS = 32  # output rows per block of the CPU kernel
QUANT_STATE_BYTES = 96  # a 4-bit layer's quantization state (type, shape, dtype) as JSON bytes (upper bound)

# bitsandbytes logs this at every int8 matmul on CPU (the docs say it once): keep the terminal readable.
logging.getLogger("bitsandbytes.autograd._functions").addFilter(
    lambda record: "will be cast from" not in record.getMessage())


def check_method(method: str) -> None:
    if method not in METHODS:
        raise HfCompressError(f"quantization must be one of {METHODS}, not '{method}'")


def width_multiple(method: str | None) -> int:
    """What ranks and folded widths are rounded to so that every factor fits the kernel."""
    return FOUR_BIT_BLOCK if method in ("nf4", "fp4") else 1


def fits_kernel(method: str, in_features: int, out_features: int) -> bool:
    if not in_features or not out_features:  # a factor of rank 0 has nothing to quantize
        return False
    if method == "int8":
        return True
    return in_features % FOUR_BIT_BLOCK == 0 and out_features % FOUR_BIT_ROWS == 0


def linear_tensors(name: str, in_features: int, out_features: int, method: str | None,
                   dtype: torch.dtype) -> list[StoredTensor]:
    """What a checkpoint stores of the Linear at `name`'s weight (bias excluded), as bitsandbytes
    serializes it when `method` quantizes it."""
    n = in_features * out_features
    if method is None or not fits_kernel(method, in_features, out_features):
        return [StoredTensor(f"{name}.weight", dtype, (out_features, in_features))]
    if method == "int8":  # int8 weight, an fp32 scale per row, a format byte
        return [StoredTensor(f"{name}.weight", torch.int8, (out_features, in_features)),
                StoredTensor(f"{name}.SCB", torch.float32, (out_features,)),
                StoredTensor(f"{name}.weight_format", torch.uint8, ())]
    # packed nibbles, an fp32 absmax per block, the 16-entry fp32 code book, the state as JSON bytes
    return [StoredTensor(f"{name}.weight", torch.uint8, (math.ceil(n / 2), 1)),
            StoredTensor(f"{name}.weight.absmax", torch.float32, (math.ceil(n / FOUR_BIT_BLOCK),)),
            StoredTensor(f"{name}.weight.quant_map", torch.float32, (16,)),
            StoredTensor(f"{name}.weight.quant_state.bitsandbytes__{method}", torch.uint8, (QUANT_STATE_BYTES,))]


def output_head_name(model: PreTrainedModel) -> str | None:
    head = model.get_output_embeddings()
    return next((name for name, module in model.named_modules() if module is head), None)


def unquantized_modules(model: PreTrainedModel, method: str, quantize_head: bool = False) -> list[str]:
    """Linears that stay in float: the output head (unless asked) and widths the kernel cannot pack."""
    head = output_head_name(model)
    keep = [head] if head and not quantize_head else []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)) and name != head:
            shape = layer_shape(module)
            if not fits_kernel(method, shape.in_features, shape.out_features):
                keep.append(name)
    return keep


def bnb_config(method: str, skip: list[str], compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    if method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method, bnb_4bit_compute_dtype=compute_dtype,
                              llm_int8_skip_modules=skip)


@torch.no_grad()
def quantize(model: PreTrainedModel, method: str = "nf4", quantize_head: bool = False) -> PreTrainedModel:
    """A bitsandbytes-quantized copy of `model` (nf4, fp4 or int8) on the model's device.

    Experts of mixture-of-experts layers are quantized one Linear per expert and matrix (the
    model's experts are unfused in place). Embeddings and the output head keep their dtype (`quantize_head=True` quantizes an untied
    head too). The copy saves with its `quantization_config` and reloads with plain transformers.
    """
    check_method(method)
    if getattr(model.config, "quantization_config", None) is not None:
        raise HfCompressError("the model is already quantized")
    if quantize_head and getattr(model.config, "tie_word_embeddings", False):
        raise HfCompressError("the output head shares its weights with the input embeddings, which stay in "
                              "float; quantizing it would untie them")
    unfuse_experts(model)  # experts as Linears get quantized too (in place: the model computes the same)
    skip = unquantized_modules(model, method, quantize_head)
    device = input_device(model)
    with tempfile.TemporaryDirectory(prefix="hf-compress-quantize-") as tmp:
        model.save_pretrained(tmp)
        quantized = type(model).from_pretrained(  # its own class: remote-code and factorized ones too
            tmp, quantization_config=bnb_config(method, skip, model.dtype), dtype=model.dtype,
            device_map={"": device})
    info = getattr(model.config, "hf_compress", None) or {}
    quantized.config.name_or_path = model.config.name_or_path
    mark_compressed(quantized, ranks=info.get("ranks"), shapes=info.get("shapes"), source=source_of(model),
                    method=info.get("method", "bitsandbytes"), **source_sizes(model))
    return quantized.eval()
