"""Tiny random models of several architectures, a tiny tokenizer, and offline settings."""

import base64
import hashlib
import io
import json
import os
import sys
from contextlib import redirect_stderr, redirect_stdout

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "qwen2": lambda: Qwen2Config(**COMMON),  # q/k/v with bias
    "mistral": lambda: MistralConfig(**COMMON),
    "phi3": lambda: Phi3Config(**COMMON, pad_token_id=0),  # fused qkv_proj and gate_up_proj
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128),  # Conv1D
}
ARCHS = list(CONFIGS)


def tiny_model(arch: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()


def tiny_data(n: int = 16, seq_len: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="session")
def tokenizer():
    """A word-level tokenizer trained in milliseconds on the builtin corpus."""
    from hf_compress.data import builtin_text

    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<eos>"])
    backend.train_from_iterator(builtin_text().splitlines()[:2000], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer):
    """A small random Llama with the tiny tokenizer, saved as a checkpoint: what the benchmark
    scripts run on in the tests (wide enough for the 4-bit kernel, 512 positions for their windows)."""
    torch.manual_seed(0)
    config = LlamaConfig(**{**COMMON, "hidden_size": 128, "intermediate_size": 256, "max_position_embeddings": 512})
    path = tmp_path_factory.mktemp("tiny") / "llama"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _quiet_threads():
    torch.set_num_threads(2)


def run_cli(*args) -> tuple[int, str, str]:
    """Run `hf-compress ARGS` in this process (a subprocess would spend seconds importing torch
    first); returns (exit code, stdout, stderr)."""
    from hf_compress.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, ["hf-compress", *map(str, args)]
    try:
        with redirect_stdout(out), redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        sys.argv = argv
    return exit_info.value.code, out.getvalue(), err.getvalue()


def ok(*args) -> tuple[str, str]:
    """`hf-compress ARGS` that must succeed: (stdout, stderr)."""
    code, out, err = run_cli(*args)
    assert code in (0, None), err
    return out, err


def refused(*args) -> str:
    """`hf-compress ARGS` that must fail with one sentence: that sentence."""
    code, _, err = run_cli(*args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and lines[-1].startswith("error: ") and "Traceback" not in err, err
    return lines[-1]


# --- an in-process Hub: the real huggingface_hub client, its HTTP transport answered here ---------------

REPO = "me/tiny-folded"
COMMIT = "a" * 40


class FakeHub:
    """The endpoints a push uses, answered in-process; every request is kept, every commit made
    (`made`) and the files they hold (`files`). `fail`: 'network' (no connection at all), 'refused' (the Hub rejects the
    token) or 'second commit' (the connection drops at the second commit)."""

    def __init__(self):
        self.requests, self.fail, self.files, self.made = [], None, {}, []
        self.models = {}  # (repo, revision) -> {file name: bytes}, served for download
        self.gated, self.broken = set(), set()  # repos that refuse downloads; files whose download drops

    def serve(self, repo: str, directory, revision: str = "main", gated: bool = False) -> None:
        """Serve the files of a local checkpoint as `repo` at `revision`."""
        self.models[repo, revision] = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
        if gated:
            self.gated.add(repo)

    def download(self, request, repo: str, revision: str, name: str):
        """A file download as the Hub answers it: HEAD gives the commit, etag and size, GET the bytes."""
        import httpx2

        if repo in self.gated:
            return httpx2.Response(401, headers={"X-Error-Code": "GatedRepo", "X-Error-Message": (
                f"Access to model {repo} is restricted. You must have access to it and be authenticated.")})
        if (repo, revision) not in self.models:
            code = "RevisionNotFound" if any(r == repo for r, _ in self.models) else "RepoNotFound"
            return httpx2.Response(404, headers={"X-Error-Code": code})
        files = self.models[repo, revision]
        if name not in files:
            return httpx2.Response(404, headers={"X-Error-Code": "EntryNotFound"})
        content = files[name]
        commit = hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()
        headers = {"X-Repo-Commit": commit, "ETag": f'"{git_oid(content)}"', "Content-Length": str(len(content))}
        if request.method == "HEAD":
            return httpx2.Response(200, headers=headers)
        if name in self.broken:
            raise httpx2.ReadError("Connection reset by peer", request=request)
        return httpx2.Response(200, headers=headers, content=content)

    def __call__(self, request):
        import httpx2

        self.requests.append(request)
        path = request.url.path
        parts = path.strip("/").split("/")
        if len(parts) >= 5 and parts[2] == "resolve":
            return self.download(request, "/".join(parts[:2]), parts[3], "/".join(parts[4:]))
        commits = sum(r.url.path.endswith("/commit/main") for r in self.requests)
        if self.fail == "network" or (self.fail == "second commit" and path.endswith("/commit/main") and commits == 2):
            raise httpx2.ConnectError("[Errno 111] Connection refused", request=request)
        if path == "/api/models/some-org/tiny-llama":  # the source's metadata: its license
            return httpx2.Response(200, json={"id": "some-org/tiny-llama", "cardData": {"license": "mit"}})
        if path == "/api/repos/create" and self.fail != "refused":
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{REPO}"})
        if path == "/api/validate-yaml":
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if path == f"/api/models/{REPO}/preupload/main":  # small files go in the commit itself, no LFS
            files = json.loads(request.content)["files"]
            return httpx2.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular",
                                                         "shouldIgnore": False, "oid": git_oid(self.files.get(
                                                             f["path"]))} for f in files]})
        if path == f"/api/models/{REPO}/commit/main":
            self.files |= self.committed(request)
            self.made.append(request)
            return httpx2.Response(200, json={"commitUrl": f"https://huggingface.co/{REPO}/commit/{COMMIT}",
                                              "commitOid": COMMIT})
        if path == f"/api/models/{REPO}/revision/main":  # asked when a commit would change nothing
            return httpx2.Response(200, json={"id": REPO, "sha": COMMIT})
        if self.fail == "refused":
            return httpx2.Response(401, json={"error": "Invalid username or password."})
        return httpx2.Response(404, json={"error": "Repository not found"})

    def commits(self) -> list[tuple[str, dict[str, bytes]]]:
        """The message and the uploaded files of every commit made."""
        return [(json.loads(r.content.splitlines()[0])["value"]["summary"], self.committed(r)) for r in self.made]

    def commit(self) -> tuple[str, dict[str, bytes]]:
        """The commit message and the uploaded files of the one commit sent."""
        [commit] = self.commits()
        return commit

    @staticmethod
    def committed(request) -> dict[str, bytes]:
        lines = [json.loads(line) for line in request.content.splitlines()]
        return {line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in lines
                if line["key"] == "file"}


def git_oid(content: bytes | None) -> str | None:
    """The git blob id the Hub reports for a file it holds."""
    return None if content is None else hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The real huggingface_hub client, its HTTP transport replaced by a FakeHub, online and
    logged in for this test only."""
    import httpx2
    import huggingface_hub
    from huggingface_hub.utils._http import default_client_factory

    fake = FakeHub()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))  # downloads
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(fake)))
    try:
        yield fake
    finally:
        huggingface_hub.set_client_factory(default_client_factory)  # closes the fake session too
        huggingface_hub.close_session()
