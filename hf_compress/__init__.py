"""hf-compress: compress Hugging Face causal LMs into ordinary, smaller checkpoints.

The public names load on first use, so that the command line (`hf-compress --help`) starts
without importing torch and transformers.
"""

import importlib
import sys
import types

__version__ = "0.1.0"

_HOMES = {  # public name -> the module that defines it
    "AcipConfig": "acip.config", "CompressibleModel": "acip.compressible", "acip": "acip.train",
    "calibration_data": "data", "HfCompressError": "errors", "FoldConfig": "shrink.config", "fold": "shrink.driver",
    "load_model": "loading", "PruneConfig": "shrink.config", "prune": "shrink.driver", "quantize": "quantize",
    "TextSource": "data",
}
__all__ = sorted(_HOMES)


class _Package(types.ModuleType):
    """Two public functions (acip, quantize) share their names with submodules, which the import
    system binds on the package as it loads them: the function keeps the name, as it did when
    everything was imported eagerly (the submodules stay in sys.modules)."""

    def __getattr__(self, name):
        if name not in _HOMES:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
        super().__setattr__(name, value)
        return value

    def __setattr__(self, name, value):
        if not (name in _HOMES and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)

    def __dir__(self):
        return sorted({*super().__dir__(), *_HOMES})


sys.modules[__name__].__class__ = _Package
