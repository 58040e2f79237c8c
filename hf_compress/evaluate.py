"""Held-out perplexity with one protocol: non-overlapping windows, token-level mean NLL."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, show_progress: bool = False) -> dict:
    """exp(mean NLL) over every predicted token of the (n x seq_len) windows, each scored
    independently (no context carried across windows)."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc="perplexity", disable=not show_progress, leave=False):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    return {"perplexity": math.exp(total_nll / total_tokens), "tokens": total_tokens,
            "windows": len(windows), "seq_len": windows.shape[1]}
