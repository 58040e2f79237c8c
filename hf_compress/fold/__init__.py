"""Data-free folding: merge similar MLP channels and attention head groups with k-means."""

from .config import FoldConfig
from .model import fold

__all__ = ["FoldConfig", "fold"]
