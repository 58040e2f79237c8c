"""Structured pruning with data: remove whole MLP channels and key/value head groups."""

from .config import PruneConfig
from .model import prune

__all__ = ["PruneConfig", "prune"]
