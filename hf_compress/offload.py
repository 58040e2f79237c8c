"""Models spread by Accelerate's big-model loading (`device_map="auto"`, `max_memory`): where their
inputs go, and a part of them made resident while it is rewritten.

Accelerate offloads a model module by module: an offloaded module's weights sit on the meta
device and a hook loads them (from CPU memory or from disk) for each forward. Reading or
rewriting weights outside a forward (fold, prune, the allocation's trial shrinks) needs them
resident first; `resident` loads them, and afterwards offloads what the block then holds, its
rewritten layers included, the way it found them.
"""

from __future__ import annotations

import gc
import tempfile
from contextlib import contextmanager

import torch
from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module
from accelerate.utils import OffloadedWeightsLoader, offload_state_dict, set_module_tensor_to_device
from torch import nn


def input_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: the device its first layers run on (its own parameters may
    sit on the meta device when Accelerate offloaded them)."""
    hook = getattr(model, "_hf_hook", None)
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    return next(model.parameters()).device


@contextmanager
def resident(module: nn.Module, keep_changes: bool = False):
    """Within the block, the offloaded weights of `module`'s layers are real tensors on the device
    they run on (nothing happens to a module that is not offloaded). With `keep_changes` a layer
    that changed (new weights, or a new module of another shape or made of two Linears) is
    offloaded anew: to a new folder beside the offload folder when it was on disk, else to CPU
    memory; a layer left as it was goes back to the weights it had."""
    hooks = {name: sub._hf_hook for name, sub in module.named_modules()
             if getattr(getattr(sub, "_hf_hook", None), "offload", False)}
    loaded = {}
    for name, hook in hooks.items():
        layer = module.get_submodule(name)
        remove_hook_from_module(layer)
        for key in own_tensors(layer, hook.offload_buffers):
            set_module_tensor_to_device(layer, key, hook.execution_device, value=hook.weights_map[key])
        loaded[name] = (layer, _fingerprint(layer, hook.offload_buffers))
    try:
        yield module
    finally:
        for name, hook in hooks.items():
            layer = module.get_submodule(name)
            if not keep_changes or (layer, _fingerprint(layer, hook.offload_buffers)) == loaded[name]:
                add_hook_to_module(layer, hook)  # its init moves the weights back to the meta device
                continue
            for part in layer.modules():  # each module that holds tensors gets a hook of its own
                if tensors := own_tensors(part, hook.offload_buffers):
                    add_hook_to_module(part, AlignDevicesHook(
                        hook.execution_device, offload=True, io_same_device=False, weights_map=_offload(tensors, hook),
                        offload_buffers=hook.offload_buffers, place_submodules=False, skip_keys=hook.skip_keys))
        if hooks and keep_changes:
            gc.collect()  # the layers replaced sit in reference cycles (hook wrappers): free them now, not in blocks' time


def own_tensors(layer: nn.Module, buffers: bool) -> dict[str, torch.Tensor]:
    """A module's own parameters (and buffers), not its children's, by name."""
    own = dict(layer.named_parameters(recurse=False))
    return own | dict(layer.named_buffers(recurse=False)) if buffers else own


def _fingerprint(layer: nn.Module, buffers: bool) -> dict:
    """What changes when a layer's weights do: every rewrite assigns new tensors (`.data =`), an
    in-place edit bumps the tensor's version."""
    return {name: (id(t), t.data_ptr(), t._version) for name, t in own_tensors(layer, buffers).items()}


def _offload(tensors: dict[str, torch.Tensor], hook):
    """`tensors` where the hook found the old ones: a new folder on disk, or CPU memory."""
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    loader = getattr(hook.weights_map, "dataset", hook.weights_map)
    if isinstance(loader, OffloadedWeightsLoader) and loader.save_folder is not None:
        folder = tempfile.mkdtemp(prefix="rewritten-", dir=loader.save_folder)  # removed with the offload folder
        offload_state_dict(folder, tensors)
        return OffloadedWeightsLoader(save_folder=folder)
    return tensors
