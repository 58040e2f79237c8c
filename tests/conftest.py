"""Tiny random models of several architectures, a tiny tokenizer, and offline settings."""

import io
import os
import sys
from contextlib import redirect_stderr, redirect_stdout

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "qwen2": lambda: Qwen2Config(**COMMON),  # q/k/v with bias
    "mistral": lambda: MistralConfig(**COMMON),
    "phi3": lambda: Phi3Config(**COMMON, pad_token_id=0),  # fused qkv_proj and gate_up_proj
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128),  # Conv1D
}
ARCHS = list(CONFIGS)


def tiny_model(arch: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()


def tiny_data(n: int = 16, seq_len: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="session")
def tokenizer():
    """A word-level tokenizer trained in milliseconds on the builtin corpus."""
    from hf_compress.data import builtin_text

    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<eos>"])
    backend.train_from_iterator(builtin_text().splitlines()[:2000], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer):
    """A small random Llama with the tiny tokenizer, saved as a checkpoint: what the benchmark
    scripts run on in the tests (wide enough for the 4-bit kernel, 512 positions for their windows)."""
    torch.manual_seed(0)
    config = LlamaConfig(**{**COMMON, "hidden_size": 128, "intermediate_size": 256, "max_position_embeddings": 512})
    path = tmp_path_factory.mktemp("tiny") / "llama"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _quiet_threads():
    torch.set_num_threads(2)


def run_cli(*args) -> tuple[int, str, str]:
    """Run `hf-compress ARGS` in this process (a subprocess would spend seconds importing torch
    first); returns (exit code, stdout, stderr)."""
    from hf_compress.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, ["hf-compress", *map(str, args)]
    try:
        with redirect_stdout(out), redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        sys.argv = argv
    return exit_info.value.code, out.getvalue(), err.getvalue()


def ok(*args) -> tuple[str, str]:
    """`hf-compress ARGS` that must succeed: (stdout, stderr)."""
    code, out, err = run_cli(*args)
    assert code in (0, None), err
    return out, err


def refused(*args) -> str:
    """`hf-compress ARGS` that must fail with one sentence: that sentence."""
    code, _, err = run_cli(*args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and lines[-1].startswith("error: ") and "Traceback" not in err, err
    return lines[-1]
