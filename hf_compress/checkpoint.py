"""Writing a checkpoint: weights, config, tokenizer and model card, all or nothing."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedModel

from .cards import write_card
from .io import atomic_dir
from .layers import SHARD_BYTES


def save_checkpoint(model: PreTrainedModel, tokenizer, output: str | Path, overwrite=False,
                    max_shard_size: int | str = SHARD_BYTES) -> Path:
    """Write model and tokenizer atomically: the output appears complete or not at all. The weights
    go in files of at most `max_shard_size`, written one at a time (weights Accelerate offloaded
    are read back for their file only)."""
    if getattr(model, "hf_device_map", None):
        model.tie_weights()  # Accelerate's hooks replace offloaded parameters: a tied head would be stored twice
    with atomic_dir(output, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if getattr(model.config, "hf_compress", None):  # a model hf-compress made: say what it is
            write_card(tmp, Path(output).name)
    return Path(output)
