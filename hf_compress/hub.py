"""Publishing to the Hub: check that a directory is whole, give it its model card for the target
repo (a README.md the user wrote goes as it is), and upload it: in one commit, or, past
`COMMIT_BYTES`, one commit per group of files, so that an interrupted push resumes when rerun
(huggingface_hub skips every file the Hub already holds unchanged, and large files it already
received). Everything that can be checked without the network is checked first, so a refused
push uploads nothing."""

from __future__ import annotations

from pathlib import Path

from .cards import CARD_FILE, HUB_ID, describe, is_generated, model_card
from .errors import HfCompressError, first_line

COMMIT_BYTES = 5 * 2**30  # at most this much data in one commit of a large push


def _check_repo_id(repo_id: str) -> None:
    """Refuse an id the Hub would refuse, before anything else happens."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
        valid = bool(HUB_ID.match(repo_id))
    except HFValidationError:
        valid = False
    if not valid:
        raise HfCompressError(f"'{repo_id}' is not a Hub repository id: use 'user/name' with letters, digits, "
                              "'-', '_' or '.'")


def _check_can_upload(repo_id: str, token: str | None) -> str:
    """The token to push with; offline mode or no token at all is refused before any request."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise HfCompressError(f"cannot push to {repo_id} in offline mode: unset HF_HUB_OFFLINE to upload")
    token = token or get_token()
    if not token:
        raise HfCompressError("no Hugging Face token found: run `hf auth login` or pass --token")
    return token


def _check_safetensors(file: Path) -> None:
    """A truncated or corrupt file fails here (its header must match its length), before upload."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, "pt") as handle:
            handle.keys()
    except (OSError, SafetensorError) as err:
        raise HfCompressError(f"{file} is incomplete or corrupt: {first_line(err)}") from None


def commit_groups(path: Path, files: list[str], commit_bytes: int = COMMIT_BYTES) -> list[list[str]]:
    """`files` in order, cut into groups of at most `commit_bytes` (a larger file alone)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name in files:
        nbytes = (path / name).stat().st_size
        if groups[-1] and size + nbytes > commit_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def push(path: str | Path, repo_id: str, private: bool = False, dry_run: bool = False,
         token: str | None = None, commit_bytes: int = COMMIT_BYTES) -> dict:
    """Upload the directory to `repo_id`: one commit, or one per `commit_bytes` of files with the
    card in the last (the model page appears once the weights are all there). Its generated
    README.md is regenerated for the repo id (model-index name, usage snippet); the local
    directory is never modified. `dry_run` checks and renders the card without any network."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    path = Path(path)
    _check_repo_id(repo_id)
    if not dry_run:
        token = _check_can_upload(repo_id, token)
    for file in describe(path)["weights"]:
        _check_safetensors(file)
    own_card = not is_generated(path / CARD_FILE)
    card = (path / CARD_FILE).read_text() if own_card else str(model_card(path, repo_id, online=not dry_run))
    names = (p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    files = sorted(name for name in names
                   if name != CARD_FILE and not any(part.startswith(".") for part in name.split("/")))
    groups = commit_groups(path, files, commit_bytes)
    plan = {"repo_id": repo_id, "files": sorted([*files, CARD_FILE]), "card": card, "own_card": own_card,
            "commits": len(groups)}
    if dry_run:
        return plan
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        for number, group in enumerate(groups, 1):
            operations = [CommitOperationAdd(name, str(path / name)) for name in group]
            if number == len(groups):
                operations.append(CommitOperationAdd(CARD_FILE, card.encode()))
            part = f" ({number}/{len(groups)})" if len(groups) > 1 else ""
            commit = api.create_commit(repo_id, operations, commit_message=f"Upload with hf-compress{part}")
    except (HfHubHTTPError, ValueError) as err:  # the Hub answered: a bad token, no write access, a refused card
        status = getattr(getattr(err, "response", None), "status_code", None)
        why = ("the token cannot write there; run `hf auth login` with a write token or pass --token"
               if status in (401, 403) else first_line(err))
        raise HfCompressError(f"the Hub refused the push to {repo_id}: {why}") from None
    except Exception as err:  # no answer: connection, DNS, timeout
        resume = "; rerun the same command to resume" if len(groups) > 1 else ""
        raise HfCompressError(f"cannot reach the Hugging Face Hub to push to {repo_id} "
                              f"({type(err).__name__}: {first_line(err)}); check the network connection"
                              f"{resume}") from None
    return {**plan, "url": str(url), "commit": commit.oid}
