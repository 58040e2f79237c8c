"""What the benchmark scripts share: held-out windows, perplexity at several sizes, one pass run and
measured, published shapes as random checkpoints, and the results JSON with its Markdown table. No
benchmark script imports another."""

import json
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

import hf_compress as hfc
from hf_compress.data import builtin_text
from hf_compress.evaluate import perplexity

SHAPES = {  # the published configs' shapes; "tiny" for the scripts' smoke runs
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      vocab_size=32000, num_hidden_layers=32),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      vocab_size=128256, num_hidden_layers=32, rope_theta=500000.0, max_position_embeddings=8192),
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                        vocab_size=128256, num_hidden_layers=16, rope_theta=500000.0, tie_word_embeddings=True),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=512, num_hidden_layers=2, max_position_embeddings=512),
}


def save_random_model(shape: str, path: Path, blocks: int | None = None, dtype: torch.dtype = torch.float32,
                      device: str = "cpu") -> LlamaConfig:
    """A Llama of a published shape with random weights, saved with a word-level tokenizer trained on
    the builtin text (so every command runs on it offline)."""
    config = LlamaConfig(**{**SHAPES[shape], **({"num_hidden_layers": blocks} if blocks else {})})
    torch.manual_seed(0)
    with torch.device(device):  # initialized where it runs: an 8B model builds in seconds on a GPU
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path)
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(builtin_text().splitlines(), trainers.WordLevelTrainer(
        vocab_size=min(config.vocab_size, 8192), special_tokens=["<unk>", "<eos>"]))
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>").save_pretrained(path)
    return config


def save_and_print(out: Path, name: str, results: dict, columns: list[str], rows: dict[str, list[str]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print("\n| method | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for method, cells in rows.items():
        print(f"| {method} | " + " | ".join(cells) + " |")


def perplexity_splits(tokenizer, test: int, validation: int, out_of_domain: int) -> dict:
    """512-token windows: test = the first `test` of the pydoc test split, validation = the
    last `validation` of its validation split, out-of-domain = the first `out_of_domain` of the
    news corpus' test split (news is in no builtin calibration set). Pydoc, not `builtin`, so
    that figures stay comparable across changes of the default corpus."""
    return {"test": hfc.calibration_data(tokenizer, "builtin:pydoc", seq_len=512, split="test")[:test],
            "validation": hfc.calibration_data(tokenizer, "builtin:pydoc", seq_len=512,
                                               split="validation")[-validation:],
            "out-of-domain": hfc.calibration_data(tokenizer, "builtin:news", seq_len=512, split="test",
                                                  max_windows=out_of_domain)}


def measure(build, ratios, splits) -> dict:
    """Perplexity of build(ratio) on every split, at every ratio."""
    return {str(r): {name: round(perplexity(build(r), windows)["perplexity"], 3) for name, windows in splits.items()}
            for r in ratios}


def run_pass(source, data, ratios, splits, **settings) -> tuple[dict, hfc.CompressibleModel]:
    model, _ = hfc.load_model(source)
    start = time.perf_counter()
    cm = hfc.acip(model, data, stop_ratio=0.4, batch_size=4, show_progress=False, **settings)
    record = {"pass_seconds": round(time.perf_counter() - start, 1), "steps": cm.summary["steps"],
              "final_ratio": round(cm.summary["final_ratio"], 4), "sizes": measure(cm.materialize, ratios, splits)}
    print(settings, record, flush=True)
    return record, cm
