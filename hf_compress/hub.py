"""Publishing to the Hub: check that a directory is whole, write its model card from what the
directory records (method, size, source, eval_results.json), and upload it in one commit."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import HfCompressError
from .evaluate import RESULTS_FILE, results_table
from .models import first_line, read_json

CARD_FILE = "README.md"
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def describe(path: str | Path) -> dict:
    """What `path` holds, after checking that every file the loaders need is there and readable."""
    from .acip.compressible import FACTORS_FILE, META_FILE

    path = Path(path)
    if not (path / "config.json").is_file():
        raise HfCompressError(f"{path} is not a model directory (no config.json)")
    config = read_json(path / "config.json", "model config")
    if (path / META_FILE).is_file():
        meta = read_json(path / META_FILE, "compressible metadata")
        kind, info = "compressible", {**meta.get("summary", {}), "method": "acip", "config": meta.get("config")}
        if not (path / FACTORS_FILE).is_file():
            raise HfCompressError(f"{path} is not a complete compressible directory (no {FACTORS_FILE})")
    elif "hf_compress" in config:
        kind, info = "checkpoint", config["hf_compress"]
    else:
        raise HfCompressError(f"{path} was not written by hf-compress (no hf_compress entry in config.json, "
                              f"no {META_FILE})")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise HfCompressError(f"{path} has no safetensors weights")
    for file in weights:
        _check_safetensors(file)
    results = path / RESULTS_FILE
    return {"kind": kind, "info": info, "remote_code": "auto_map" in config,
            "results": read_json(results, "evaluation results") if results.is_file() else None}


def _check_safetensors(file: Path) -> None:
    """A truncated or corrupt file fails here (its header must match its length), before upload."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, "pt") as handle:
            handle.keys()
    except (OSError, SafetensorError) as err:
        raise HfCompressError(f"{file} is incomplete or corrupt: {first_line(err)}") from None


def model_card(path: str | Path, repo_id: str):
    """A `huggingface_hub.ModelCard` for the directory, with model-index metadata from its
    eval_results.json when that evaluated exactly one size."""
    from huggingface_hub import ModelCard, ModelCardData

    about = describe(path)
    info, results = about["info"], about["results"]
    source = info.get("source") or ""
    metadata = dict(library_name="transformers", pipeline_tag="text-generation",
                    tags=["hf-compress", info.get("method", "compressed")])
    if HUB_ID.match(source) and not Path(source).exists():
        metadata["base_model"] = source
    if results and len(results["results"]) == 1:
        metadata["model-index"] = [{**entry, "name": repo_id} for entry in results["model_index"]]
    sections = [f"# {repo_id.split('/')[-1]}", _summary(about, source), _usage(about, repo_id),
                _settings(info)]
    if results:
        sections.append(_results_table(results))
    sections.append("Made with hf-compress.")
    content = "\n\n".join(sections) + "\n"
    return ModelCard(f"---\n{ModelCardData(**metadata).to_yaml()}\n---\n\n{content}")


def _summary(about: dict, source: str) -> str:
    info = about["info"]
    origin = f"`{source if HUB_ID.match(source) else Path(source).name}`" if source else "A causal language model"
    if about["kind"] == "compressible":
        return (f"{origin} after one ACIP pass: every singular value of its targeted Linear layers is "
                "ranked, so a checkpoint of any size can be materialized from this repository in about a "
                f"second. The pass ran {info.get('steps', 0)} steps and reached size ratio "
                f"{info.get('final_ratio', 1.0):.3f}.")
    method = {"acip": "ACIP (low-rank factors of its Linear layers, ranked by one gradient pass)",
              "fold": "data-free folding (similar MLP channels and head groups merged by k-means)"}
    return (f"{origin} compressed with {method.get(info.get('method'), info.get('method', 'hf-compress'))}: "
            f"its targeted Linear layers keep {info.get('size_ratio', 1.0):.1%} of their parameters "
            f"({info.get('target_params', 0):,} of {info.get('target_dense_params', 0):,}).")


def _usage(about: dict, repo_id: str) -> str:
    if about["kind"] == "compressible":
        return ("## Use\n\n```bash\npip install hf-compress\n"
                f"hf download {repo_id} --local-dir acip\n"
                "hf-compress materialize acip --size-ratio 0.6 --output acip-0.6\n```")
    remote = ", trust_remote_code=True" if about["remote_code"] else ""
    note = ("\n\nThe repository carries its own modeling file (torch and transformers only); "
            "`trust_remote_code=True` lets transformers use it." if remote else "")
    return ("## Use\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"model = AutoModelForCausalLM.from_pretrained(\"{repo_id}\"{remote})\n"
            f"tokenizer = AutoTokenizer.from_pretrained(\"{repo_id}\")\n```{note}")


def _settings(info: dict) -> str:
    settings = {key: info[key] for key in ("method", "size_ratio", "fold", "config", "steps") if key in info}
    return "## Compression settings\n\n```json\n" + json.dumps(settings, indent=2) + "\n```"


def _results_table(results: dict) -> str:
    columns, rows = results_table(results["results"])
    protocol = results.get("protocol", {}).get("perplexity")
    how = (f"\n\nPerplexity: {protocol['dataset']} ({protocol['split']}), {protocol['windows']} windows of "
           f"{protocol['seq_len']} tokens, {protocol['method']}." if protocol else "")
    lines = ["| " + " | ".join(cells) + " |" for cells in [columns, ["---"] * len(columns), *rows]]
    return "## Evaluation\n\n" + "\n".join(lines) + how


def push(path: str | Path, repo_id: str, private: bool = False, dry_run: bool = False,
         token: str | None = None) -> dict:
    """Upload the directory to `repo_id` in one commit, with a generated model card unless the
    directory has its own README.md. `dry_run` checks and writes the card without any network."""
    from huggingface_hub import CommitOperationAdd, HfApi

    path = Path(path)
    if not HUB_ID.match(repo_id):
        raise HfCompressError(f"--repo-id must look like 'user/name', got '{repo_id}'")
    card = model_card(path, repo_id)
    own_card = (path / CARD_FILE).is_file()
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    plan = {"repo_id": repo_id, "files": files if own_card else sorted([*files, CARD_FILE]),
            "card": (path / CARD_FILE).read_text() if own_card else str(card), "own_card": own_card}
    if dry_run:
        return plan
    operations = [CommitOperationAdd(name, str(path / name)) for name in files]
    if not own_card:
        operations.append(CommitOperationAdd(CARD_FILE, str(card).encode()))
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.create_commit(repo_id, operations, commit_message="Upload with hf-compress")
    except Exception as err:  # network, auth, offline mode: one sentence for the user
        raise HfCompressError(f"cannot push to {repo_id}: {first_line(err)}") from None
    return {**plan, "url": str(url), "commit": commit.oid}
