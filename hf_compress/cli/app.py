"""The typer application and what its commands share: loading where the user asked, printing
sizes, building a config from a command's parameters."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer
from rich.console import Console

from ..errors import HfCompressError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress Hugging Face causal LMs into smaller, ordinary checkpoints.")
console = Console(stderr=True, soft_wrap=True)


def config_from(cls, parameters: dict, **values):
    """A settings dataclass from the command's parameters of the same names (every field a
    command declares reaches the config; `values` add or replace fields)."""
    names = {field.name for field in dataclasses.fields(cls)}
    return cls(**{name: value for name, value in parameters.items() if name in names} | values)


def check_output_dir(output: Path, overwrite: bool) -> None:
    """An existing output is replaced only with --overwrite, and only if hf-compress wrote it:
    `--output . --overwrite` must not delete the user's working directory."""
    from ..formats import written_by_hf_compress  # inside: importing it imports torch (start-up)
    from ..io import check_output

    check_output(output, overwrite)
    if output.exists() and not written_by_hf_compress(output):
        raise HfCompressError(f"{output} was not written by hf-compress, so --overwrite does not replace it; choose "
                              "another --output")


def check_ratio(value: float, allow_one: bool = True) -> None:
    if not (0 < value < 1 or (allow_one and value == 1)):
        raise HfCompressError(f"ratio must be in (0, 1{']' if allow_one else ')'}, got {value}")


def check_quantize(method: str | None) -> None:
    from ..quantize import check_method

    if method is not None:
        check_method(method)


def progress_dir(output: Path) -> Path:
    """Resumable state of an unfinished run, beside the output it will become."""
    return output.parent / f".{output.name}.progress"


def load(model: str, device: str | None, dtype: str | None, trust_remote_code: bool, revision: str | None = None,
         token: str | None = None, device_map: str | None = None, max_memory: str | None = None):
    from ..loading import load_model, resolve_device, resolve_dtype

    where = resolve_device(device)
    return load_model(model, resolve_dtype(dtype, where), where, trust_remote_code, revision, token,
                      **placement(device_map, max_memory))


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def placement(device_map: str | None, max_memory: str | None) -> dict:
    """load_model's device_map and max_memory from the options (--max-memory alone means auto)."""
    from ..loading import parse_max_memory

    if device_map is not None and device_map not in DEVICE_MAPS:
        raise HfCompressError(f"--device-map takes {', '.join(DEVICE_MAPS)}, not '{device_map}'")
    if max_memory is None:
        return {"device_map": device_map, "max_memory": None}
    return {"device_map": device_map or "auto", "max_memory": parse_max_memory(max_memory)}


def load_compressible(path, device: str | None, dtype: str | None, trust_remote_code: bool,
                      device_map: str | None = None, max_memory: str | None = None):
    from ..acip import CompressibleModel
    from ..loading import resolve_device, resolve_dtype

    where = resolve_device(device)
    wanted = resolve_dtype(dtype, where)
    placed = placement(device_map, max_memory)
    if placed["device_map"]:  # the base stays where Accelerate put it
        return CompressibleModel.from_pretrained(path, trust_remote_code, wanted, **placed)
    compressible = CompressibleModel.from_pretrained(path, trust_remote_code)
    return compressible.to(where, None if wanted == "auto" else wanted)


def ratio_within_loss(compressible, max_increase: float, text, seq_len: int, windows: int,
                      quantize: str | None, **options) -> tuple[float, dict]:
    """The loss-budget search of `CompressibleModel.ratio_within_loss` on held-aside windows of
    `text` (a data.TextSource; `data.held_aside`), printed as it goes."""
    from ..data import held_aside

    dataset = text.dataset
    data, split = held_aside(compressible.tokenizer, text, seq_len, windows)
    console.print(f"searching the smallest size whose loss is within {max_increase:.1%} of the dense model's "
                  f"({len(data)} windows of {seq_len} tokens of {dataset}, {split} split)", highlight=False)

    def report(ratio: float, loss: float, fits: bool) -> None:
        console.print(f"  size ratio {ratio:.2f}: loss {loss:.4f} {'fits' if fits else 'over the limit'}", highlight=False)

    ratio, search = compressible.ratio_within_loss(data, max_increase, quantize, report=report, **options)
    console.print(f"dense loss {search['dense_loss']:.4f}, limit {search['limit']:.4f}: size ratio {ratio:.2f}",
                  highlight=False)
    return ratio, {**search, "dataset": dataset, "split": split, "seq_len": seq_len, "windows": len(data)}


def on_disk(directory: Path) -> str:
    """What a written checkpoint takes: weight files, and the rest apart."""
    from ..formats import disk_bytes

    weights, other = disk_bytes(directory)
    return f"{weights / 2**20:.1f} MiB of weight files ({weights:,} bytes; config, tokenizer and card {other / 2**20:.1f} MiB)"


def quantized_note(model) -> str:
    from ..formats import quantization_of

    quantization = quantization_of(model.config)
    if quantization is None:
        return ""
    kept = len(quantization["unquantized"])
    multiple = model.config.hf_compress.get("width_multiple", 1)  # quantize() records it on every model
    rounded = f", ranks and widths rounded to multiples of {multiple} for the 4-bit kernel" if multiple > 1 else ""
    return f", {quantization['method']} ({kept} Linear layers left in float{rounded})"
