"""Writing a checkpoint: weights, config, tokenizer and model card, all or nothing."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedModel

from .cards import write_card
from .io import atomic_dir


def save_checkpoint(model: PreTrainedModel, tokenizer, output: str | Path, overwrite=False) -> Path:
    """Write model and tokenizer atomically: the output appears complete or not at all."""
    with atomic_dir(output, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if getattr(model.config, "hf_compress", None):  # a model hf-compress made: say what it is
            write_card(tmp, Path(output).name)
    return Path(output)
