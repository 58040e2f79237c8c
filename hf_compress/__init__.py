"""hf-compress: compress Hugging Face causal LMs into ordinary, smaller checkpoints."""

from .acip import AcipConfig, CompressibleModel, acip
from .data import calibration_data
from .errors import HfCompressError
from .fold import FoldConfig, fold
from .loading import load_model
from .prune import PruneConfig, prune
from .quantize import quantize

__version__ = "0.1.0"

__all__ = ["AcipConfig", "CompressibleModel", "FoldConfig", "HfCompressError", "PruneConfig", "acip",
           "calibration_data", "fold", "load_model", "prune", "quantize"]
