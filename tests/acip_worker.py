"""Run a short ACIP pass on a tiny seeded model and save its score map (single or multi-process).

Used by test_distributed.py: `python acip_worker.py OUT` or `torchrun --nproc_per_node 2 ...`
(OBJECTIVES=saliency,torque runs one pass per objective in the same processes, saved by objective;
PRUNE=torque saves a torque-pruned model's weights instead).
"""

import os
import sys

import torch
from accelerate import PartialState
from transformers import AutoModelForCausalLM, LlamaConfig

import hf_compress as hfc
from hf_compress.acip import layer, objectives


def tiny_model():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(config).eval()


def record_sharding(rows_held: list, objective: str) -> None:
    """Note, at each step, the share of U's rows this process holds (below 1 when FSDP shards)."""
    cls = objectives.OBJECTIVES[objective]
    real_step = cls.step

    def step(self, layers, *args):
        u = next(iter(layers.values())).u
        local = u.to_local() if hasattr(u, "to_local") else u
        rows_held.append(local.shape[0] / u.shape[0])
        real_step(self, layers, *args)

    cls.step = step


def count_factorizations(calls: list) -> None:
    """Note each SVD this process computes (under FSDP: only its share of the blocks)."""
    real = layer.svd_factors

    def svd_factors(*args):
        calls.append(1)
        return real(*args)

    layer.svd_factors = svd_factors


if __name__ == "__main__":
    torch.set_num_threads(1)
    rows_held, factorized = [], []
    count_factorizations(factorized)
    data = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(1))
    if os.environ.get("PRUNE") == "torque":
        pruned = hfc.prune(tiny_model(), data, method="torque", ratio=0.5, max_steps=6, batch_size=4, lr=1e-4,
                           strength=3.0, show_progress=False)
        if PartialState().is_main_process:
            torch.save(pruned.state_dict(), sys.argv[1])
        sys.exit()
    saved = {}
    for objective in os.environ.get("OBJECTIVES", "saliency").split(","):
        rows_held.clear()
        factorized.clear()
        record_sharding(rows_held, objective)
        result = hfc.acip(tiny_model(), data, max_steps=12, stop_ratio=0.3, batch_size=4, lora_rank=2,
                          objective=objective, show_progress=False)
        saved[objective] = {name: f.score for name, f in result.layers.items()} | {
            "_summary": result.summary, "_rows_held": max(rows_held), "_factorized": len(factorized)}
    if PartialState().is_main_process:
        torch.save(saved, sys.argv[1])
