"""The ACIP pass: one gradient-descent run that ranks every singular value of every target.

Every step: causal-LM cross-entropy on calibration windows through the masked SVD form,
backward, then the objective (acip/objectives.py: saliency by default, or the paper's ACIP,
exponential torque, DRR, nuclear norm) moves the masks with strength lambda, which the size
controller steers (or the paper's geometric schedule grows). A mask that reaches zero is pruned
for good; the order of death is the score map.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from torch import nn
from torch.nn import functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from ..formats import source_of, source_sizes, unfuse_experts
from ..errors import HfCompressError
from ..io import atomic_save, read_state
from ..layers import LayerShape, decoder_blocks, expert_params, find_targets, require_dense
from ..modeling_hf_compress import set_module_
from ..offload import own_tensors
from ..training import (StageMeter, check_launch, checkpointed_blocks, cycle_batches, fsdp_requested,
                        shuffled, training_copy)
from .compressible import CompressibleModel, LayerFactors, UnitScores
from .config import AcipConfig
from .gates import UnitGate, attach_gates, unit_sites, widths
from .layer import Ranked, SVDLinear, full
from .objectives import make_objective
from .whitening import block_covariances, cholesky

PROGRESS_FILE = "progress.pt"
COMPENSATION_WINDOWS = 16  # calibration windows kept in the compressible directory for compensation


def inject(model: nn.Module, config: AcipConfig, names,
           cholesky: torch.Tensor | None = None, waiting: bool = False) -> dict[str, SVDLinear]:
    """Replace the targets `names` in place by SVDLinears (whitened by `cholesky`, the factor of
    their shared input covariance, if given; `waiting` for another process's factors); return
    them by name."""
    layers = {name: SVDLinear(model.get_submodule(name), cholesky, config.mask_init, config.lora_rank,
                              config.lora_alpha, waiting) for name in names}
    put_back(model, layers)
    return layers


def _widths(layers: dict[str, SVDLinear], gates: dict[str, UnitGate], count) -> dict[str, tuple]:
    shapes = {name: layer.shape for name, layer in layers.items()}
    return widths(shapes, [gate.ref for gate in gates.values()], {name: count(g) for name, g in gates.items()})


def size_ratio(layers: dict[str, SVDLinear], gates: dict[str, UnitGate] | None = None) -> float:
    """Parameters the alive units make (dense cap included), as a fraction of the targets' own."""
    sizes = _widths(layers, gates or {}, lambda gate: int(gate.alive.sum()))
    kept = sum(LayerShape(*map(int, sizes[name]), layer.shape.bias).params_at_rank(layer.rank)
               for name, layer in layers.items())
    return kept / sum(layer.shape.dense_params for layer in layers.values())


@torch.no_grad()
def soft_ratio(layers: dict[str, SVDLinear], gates: dict[str, UnitGate], objective) -> float:
    """Factor size counting each alive unit by its `objective.fullness` (1 at the start, 0 at
    death), without the dense cap. It moves as soon as masks start to fall, well before they die
    (and the capped size ratio does not move until a layer drops below its cap), so lambda is
    steered by it without lag; masks that noise pushes up count as much as those it pushes down,
    so noise alone does not move it."""
    def soft(unit) -> float:
        return float((objective.fullness(unit) * unit.alive).sum())

    sizes = _widths(layers, gates, soft)
    kept = sum(soft(layer) * sum(sizes[name]) for name, layer in layers.items())
    return kept / sum(layer.shape.dense_params for layer in layers.values())


def svd_form(model, data: torch.Tensor, config: AcipConfig, device, show_progress: bool = True,
             offload: bool = False, share: tuple[int, int] | None = None) -> tuple[dict, dict]:
    """Put `model` in SVD form (whitened on the first windows of `data` if asked, one block at a
    time) on `device`, or with `offload` everything but its decoder blocks, which wait on the CPU
    and visit `device` one at a time. With `share` = (this process, processes) only the blocks
    `owner` gives this process are factorized; the others' layers wait for `share_factors`.
    Returns the SVDLinear layers and the original modules by name, the originals moved to CPU as
    soon as they are replaced (kept for the dense base). Mixture-of-experts layers become one
    Linear per expert and matrix first (for good)."""
    model.requires_grad_(False)
    unfuse_experts(model)
    with _without_blocks(model) if offload else contextlib.nullcontext():
        model.to(device)
    originals = find_targets(model, config.include, config.exclude)
    prefix, _ = decoder_blocks(model)

    def elsewhere(name: str) -> bool:
        return share is not None and owner(name, prefix, share[1]) != share[0]

    layers = {}
    if config.basis == "whitened":
        windows = data[: config.whitening_windows].to(device)
        for names, covariance in block_covariances(model, originals, list(windows.split(config.batch_size)),
                                                   show_progress, offload):
            if elsewhere(names[0]):  # (the names of one group are one block's)
                layers |= inject(model, config, names, waiting=True)
                continue
            factor = cholesky(covariance)
            del covariance
            layers |= inject(model, config, names, factor)
            for name in names:
                originals[name].to("cpu")
    unreached = [name for name in originals if name not in layers]  # plain basis, or no input seen
    if config.basis == "whitened" and unreached:
        warnings.warn(f"{len(unreached)} layers (e.g. {unreached[0]}) saw no calibration input "
                      "and use the plain SVD basis")
    for name in tqdm(unreached, desc="SVD of target layers", leave=False,
                     disable=not (show_progress and unreached)):
        layers |= inject(model, config, [name], waiting=elsewhere(name))
        originals[name].to("cpu")
    return {name: layers[name] for name in originals}, originals


def owner(name: str, prefix: str, processes: int) -> int:
    """The process that factorizes the layer `name` under FSDP: blocks are dealt out in turn."""
    return int(name[len(prefix) + 1:].split(".")[0]) % processes


@contextlib.contextmanager
def _without_blocks(model: nn.Module):
    """The model with its decoder blocks taken out for a moment (to move the rest elsewhere)."""
    prefix, blocks = decoder_blocks(model)
    holder, _, attribute = prefix.rpartition(".")
    holder = model.get_submodule(holder)
    setattr(holder, attribute, nn.ModuleList())
    try:
        yield
    finally:
        setattr(holder, attribute, blocks)


def svd_compressible(model, data: torch.Tensor, config: AcipConfig | None = None, **overrides) -> CompressibleModel:
    """The closed-form baseline: no pass, every value scored by its singular value (plain or
    whitened basis, as in SVD-LLM). Materialize it with explicit `ranks` for a per-layer
    allocation, or with a ratio for a global singular-value threshold."""
    config = config or AcipConfig(**overrides)
    layers, originals = svd_form(model, shuffled(data, config.seed), config, Accelerator().device)
    for layer in layers.values():
        layer.score.copy_(layer.s)
    put_back(model, originals)
    summary = {"method": f"{config.basis} SVD", "steps": 0}
    return _to_compressible(model, layers, config, summary, tokenizer=None)


def acip(model, data: torch.Tensor, config: AcipConfig | None = None, *, tokenizer=None,
         progress_dir: str | Path | None = None, show_progress: bool = True, fsdp: bool | None = None,
         **overrides) -> CompressibleModel:
    """Run one ACIP pass on `model` with calibration windows `data` (n x seq_len).

    Runs on whatever Accelerate is configured for: CPU, one GPU, DDP, or FSDP for models that do
    not fit one device (`fsdp=None` follows `accelerate launch --use_fsdp`). With `progress_dir`,
    a resumable checkpoint is written every `config.save_every` steps and picked up on restart.
    The model is restored to its dense self and wrapped, with the score map, in the result.
    """
    config = config or AcipConfig(**overrides)
    require_dense(model, "compress", "compress the original model and materialize other sizes from its "
                  "compressible directory")
    torch.manual_seed(config.seed)
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(split_batches=True))
    check_launch(accelerator)
    fsdp = fsdp_requested(accelerator) if fsdp is None else fsdp
    if config.loss == "dense" and fsdp:
        raise HfCompressError("--loss dense needs the dense model beside the trained one in every process; "
                              "with FSDP use --loss labels")
    if config.batch_size % accelerator.num_processes:
        raise HfCompressError(
            f"batch size {config.batch_size} must be a multiple of the {accelerator.num_processes} processes"
        )
    if len(data) < config.batch_size:
        raise HfCompressError(
            f"too little calibration data: {len(data)} windows, fewer than one batch of {config.batch_size}"
        )
    if config.max_steps * config.batch_size > len(data):
        warnings.warn(
            f"{config.max_steps} steps x {config.batch_size} windows exceed the {len(data)} calibration "
            "windows; the data will be cycled"
        )
    data = shuffled(data, config.seed)
    show_progress = show_progress and accelerator.is_main_process
    stages = StageMeter(accelerator.device)
    share = (accelerator.process_index, accelerator.num_processes) if fsdp and accelerator.num_processes > 1 else None
    layers, originals = svd_form(model, data, config, accelerator.device, show_progress, offload=fsdp, share=share)
    experts = sum(expert_params(model).values())
    if experts:
        total = sum(p.numel() for p in model.parameters())
        warnings.warn(
            f"the experts' weights ({experts / total:.0%} of the model's parameters, stored as 3-D tensors in a layout "
            "not supported) are not compressed: the size ratios of this pass count the other layers only"
        )
    # The pass trains a second module tree over the same tensors, so that `model` is its dense
    # self again at once and stays a plain transformers model whatever DDP or FSDP do to the other.
    trained = training_copy(model)
    layers = {name: trained.get_submodule(name) for name in layers}
    put_back(model, originals)
    shapes = {name: layer.shape for name, layer in layers.items()}
    gates = attach_gates(trained, unit_sites(model, config.units, shapes), shapes, config.mask_init)
    ranked = {**layers, **gates}  # everything the objective moves and the pass ranks
    teacher = model.eval() if config.loss == "dense" else None  # stays on the device, beside the trained copy
    if teacher is None:
        model.cpu()  # the dense base waits in host memory; the trained copy keeps its own device tensors
    stages.done("whitening_svd")

    progress = Path(progress_dir) / PROGRESS_FILE if progress_dir else None
    saved = _load_progress(progress, config) if progress is not None and progress.is_file() else None
    if saved is not None:
        _restore_layers(ranked, saved["layers"])
    made_here = {name: _tensors(layer) for name, layer in layers.items() if not layer.waiting} if share else {}
    wrapped = shard(trained, ranked) if fsdp else accelerator.prepare(trained)
    if share is not None:
        prefix = decoder_blocks(model)[0]
        share_factors(layers, {name: owner(name, prefix, share[1]) for name in layers}, made_here, accelerator.device)
    del made_here
    for layer in layers.values():
        layer.compact()  # after a restore, and so the cached indices follow wherever wrapping put the masks
    objective = make_objective(config, ranked)
    loras = [p for layer in layers.values() for p in (layer.lora_a, layer.lora_b) if p is not None]
    optimizer = torch.optim.AdamW(loras, lr=config.adapter_learning_rate, weight_decay=0.0) if loras else None
    state = {"step": 0, "lam": config.lambda_init, "history": [],
             "start_soft_ratio": soft_ratio(layers, gates, objective)}
    if saved is not None:
        state = saved["state"]
        if optimizer is not None:
            set_optimizer_state_dict(trained, optimizer, saved["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        objective.load_state_dict(saved["objective"])
        if accelerator.is_main_process:
            print(f"resuming the pass at step {state['step']} from {progress}")
    loader = accelerator.prepare(DataLoader(TensorDataset(data), batch_size=config.batch_size, drop_last=True))

    with checkpointed_blocks(trained, config.gradient_checkpointing):
        ratio = size_ratio(layers, gates)
        bar = tqdm(total=config.max_steps, initial=state["step"], desc="ACIP",
                   disable=not show_progress)
        # Eval mode: no dropout, so the ranking is deterministic and equal across processes.
        for (batch,) in cycle_batches(accelerator, loader, state["step"]):
            if state["step"] >= config.max_steps or ratio <= config.stop_ratio:
                break
            started = time.perf_counter()
            loss = pass_loss(wrapped, teacher, batch)
            accelerator.backward(loss)
            if fsdp:
                average_mask_grads(ranked, accelerator)
            objective.step(ranked, state["lam"])
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for unit in ranked.values():
                unit.update_scores(objective.importance(unit), objective.dying(unit), objective.depth(unit))
            state["step"] += 1
            ratio = size_ratio(layers, gates)
            target = config.target_ratio(state["step"], state["start_soft_ratio"])
            loss_value = accelerator.reduce(loss.detach(), "mean").item()
            state["history"].append({"step": state["step"], "size_ratio": round(ratio, 5), "lambda": state["lam"],
                                     "loss": round(loss_value, 4), "seconds": round(time.perf_counter() - started, 3)})
            state["lam"] = next_lambda(config, state, soft_ratio(layers, gates, objective), ratio, target)
            bar.update(1)
            bar.set_postfix(ratio=f"{ratio:.3f}", target=f"{target:.3f}", lam=f"{state['lam']:.2e}",
                            loss=f"{loss_value:.3f}")
            if progress is not None and state["step"] % config.save_every == 0:
                _save_progress(accelerator, progress, config, trained, ranked, optimizer, objective, state)
        bar.close()
    stages.done("pass")

    reached = ratio <= config.stop_ratio
    if not reached:
        warnings.warn(
            f"the pass ended at size ratio {ratio:.3f} after {state['step']} steps without reaching "
            f"{config.stop_ratio}; smaller sizes rank the remaining values by mask value only. "
            "Raise --max-steps to prune further."
        )
    summary = {"steps": state["step"], "final_ratio": ratio, "reached_stop_ratio": reached,
               "ranked_units": {kind: sum(len(g.mask) for g in gates.values() if g.ref.site.kind == kind)
                                for kind in ("mlp", "attention")},
               **({"uncompressed_expert_params": experts} if experts else {}),
               "num_processes": accelerator.num_processes, "fsdp": fsdp, "history": state["history"]}
    model.cpu()
    result = _to_compressible(model, layers, config, summary, tokenizer, gates, data[:COMPENSATION_WINDOWS])
    stages.done("finish")
    result.summary["stages"] = stages.report()
    accelerator.wait_for_everyone()
    return result


def pass_loss(model, teacher, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on the windows, or, with a `teacher` (the dense model), the KL
    divergence from its next-token distribution to the trained model's, per predicted token."""
    if teacher is None:
        return model(input_ids=batch, labels=batch, use_cache=False).loss  # no cache to refill on recompute
    logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
    with torch.no_grad():
        target = teacher(input_ids=batch, use_cache=False).logits[:, :-1].float().log_softmax(-1)
    return F.kl_div(logits.log_softmax(-1).flatten(0, 1), target.flatten(0, 1), log_target=True,
                    reduction="batchmean")


def shard(model: nn.Module, layers: dict[str, Ranked]) -> nn.Module:
    """FSDP2: each decoder block is one unit, the rest (embeddings, final norm, head) the root's.
    U, V, LoRA and the frozen weights are sharded by rows; the masks stay whole in every process
    (`average_mask_grads` averages their gradients), so every step ranks every value."""
    masks = {layer.mask for layer in layers.values()}
    for block in decoder_blocks(model)[1]:
        fully_shard(block, ignored_params=masks)
    fully_shard(model, ignored_params=masks)
    return model


def _tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {key: t.detach() for key, t in own_tensors(layer, buffers=True).items()}


@torch.no_grad()
def share_factors(layers: dict[str, SVDLinear], owners: dict[str, int], made_here: dict[str, dict],
                  device: torch.device) -> None:
    """After `shard`: each layer's tensors go from the process that factorized it (`made_here`
    holds them whole) to the others, which keep only their rows of what FSDP sharded; one layer
    is whole in a process at a time."""
    for name, layer in layers.items():  # the same order in every process
        if layer.waiting:
            layer.allocate(device)
        for key, tensor in _tensors(layer).items():
            whole = (made_here[name][key].to(device) if name in made_here
                     else torch.empty(tensor.shape, dtype=tensor.dtype, device=device))
            torch.distributed.broadcast(whole, src=owners[name])
            if layer.waiting and isinstance(tensor, DTensor):
                rows = distribute_tensor(whole, tensor.device_mesh, tensor.placements, src_data_rank=None)
                tensor.to_local().copy_(rows.to_local())
            elif layer.waiting:
                tensor.copy_(whole)
        layer.waiting = False


@torch.no_grad()
def average_mask_grads(layers: dict[str, Ranked], accelerator: Accelerator) -> None:
    """Average the masks' gradients over the processes, as DDP does for its parameters; a mask that
    no process's tokens reached keeps no gradient."""
    masks = [layer.mask for layer in layers.values()]
    reached = torch.tensor([float(m.grad is not None) for m in masks], device=masks[0].device)
    flat = torch.cat([m.grad if m.grad is not None else torch.zeros_like(m) for m in masks] + [reached])
    flat = accelerator.reduce(flat, "mean")
    *grads, reached = flat.split([len(m) for m in masks] + [len(masks)])
    for mask, grad, seen in zip(masks, grads, reached):
        mask.grad = grad.clone() if seen > 0 else None


def next_lambda(config: AcipConfig, state: dict, soft: float, ratio: float, target: float) -> float:
    """The controller: grow while the size lags the schedule, shrink while ahead, steered by the
    lag-free soft size during the schedule and by the real size after it. Or the paper's fixed
    geometric growth every `lambda_every` steps."""
    if config.lambda_schedule == "geometric":
        return state["lam"] * (config.growth if state["step"] % config.lambda_every == 0 else 1.0)
    in_schedule = state["step"] < config.schedule_fraction * config.max_steps
    steered = soft if in_schedule else ratio
    return state["lam"] * (config.growth if steered > target else 1 / config.growth)


def _layer_state(layers: dict[str, Ranked]) -> dict:
    keys = ("mask", "alive", "score", "lora_a", "lora_b")
    return {name: {k: full(getattr(layer, k)).detach().cpu() for k in keys if getattr(layer, k, None) is not None}
            for name, layer in layers.items()}


def _save_progress(accelerator, path: Path, config, model, layers, optimizer, objective, state) -> None:
    """Every process takes part (sharded LoRA and optimizer states are gathered); the main one writes."""
    payload = {"config": config.to_dict(), "state": state, "layers": _layer_state(layers),
               "objective": objective.state_dict(),
               "optimizer": None if optimizer is None else get_optimizer_state_dict(
                   model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))}
    if accelerator.is_main_process:
        atomic_save(payload, path)
    accelerator.wait_for_everyone()


def _load_progress(path: Path, config: AcipConfig) -> dict:
    payload = read_state(path)
    if payload["config"] != config.to_dict() or "objective" not in payload:  # other settings, or an older format
        raise HfCompressError(
            f"{path.parent} holds a pass with other settings; pass --overwrite to start afresh"
        )
    return payload


@torch.no_grad()
def _restore_layers(layers: dict[str, Ranked], saved: dict) -> None:
    for name, tensors in saved.items():
        for key, value in tensors.items():
            getattr(layers[name], key).copy_(value)


def put_back(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Set each named module into `model` in place of what is there."""
    for name, module in modules.items():
        set_module_(model, name, module)


@torch.no_grad()
def _to_compressible(model, layers, config, summary, tokenizer, gates=None, windows=None) -> CompressibleModel:
    """Sort each layer's values best-first and keep those that can matter (beyond the dense cap a
    layer is stored dense), and each site's units best-first; keep `windows` for compensation.
    Every process takes part (sharded factors are gathered)."""
    factors = {}
    for name, layer in layers.items():
        shape = layer.shape
        cap = math.ceil(shape.in_features * shape.out_features / (shape.in_features + shape.out_features))
        order = torch.sort(layer.s, descending=True, stable=True).indices
        order = order[torch.sort(layer.score[order], descending=True, stable=True).indices][:cap]
        lora_a = None if layer.lora_a is None else full(layer.lora_a).detach().cpu()
        lora_b = None if layer.lora_b is None else (full(layer.lora_b) * layer.lora_scale).detach().cpu()
        factors[name] = LayerFactors(shape, *(t.cpu() for t in layer.factors(order)), layer.score[order].cpu(),
                                     lora_a, lora_b)
    units = {}
    for name, gate in (gates or {}).items():
        order = torch.sort(gate.score, descending=True, stable=True).indices
        units[name] = UnitScores(gate.ref, order.cpu(), gate.score[order].cpu())
    summary = {**summary, "source": source_of(model), **source_sizes(model)}
    return CompressibleModel(model.cpu(), factors, config, summary, tokenizer, units,
                             None if windows is None else windows.cpu())
