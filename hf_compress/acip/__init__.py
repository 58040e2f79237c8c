"""ACIP: SVD parametrization, one pruning pass, materialization at any size."""

from .compressible import CompressibleModel
from .config import AcipConfig
from .layer import SVDLinear
from .train import acip

__all__ = ["AcipConfig", "CompressibleModel", "SVDLinear", "acip"]
