"""Smaller models of the same architecture: fewer MLP channels and key/value head groups.

`sites.py` finds where a block's units live, `selection.py` (with `kmeans.py` and `torque.py`)
is how each method picks them, `allocate.py` spreads a whole-model ratio over the blocks,
`rewrite.py` writes the survivors back, and `driver.py` runs them in that order for the two verbs.
"""

from .config import FoldConfig, PruneConfig, ShrinkConfig
from .driver import fold, prune, shrink

__all__ = ["FoldConfig", "PruneConfig", "ShrinkConfig", "fold", "prune", "shrink"]
