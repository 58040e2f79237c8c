"""`push`: the directory is checked, its card is regenerated for the repo id, and the real
huggingface_hub client uploads it in one commit, here to an in-process fake Hub. A refused push
says why in one sentence and leaves the local directory as it was."""

import json

import pytest
from huggingface_hub import ModelCard

from conftest import COMMIT, REPO, run_cli, tiny_data, tiny_model
from hf_compress import HfCompressError, acip, fold, load_model
from hf_compress.formats import FACTORS_FILE
from hf_compress.cards import MARKER, model_card
from hf_compress.checkpoint import save_checkpoint
from hf_compress.hub import push

@pytest.fixture
def folded_dir(tmp_path, tokenizer):
    model = tiny_model()
    model.config.name_or_path = "some-org/tiny-llama"  # as if loaded from the Hub
    save_checkpoint(fold(model, ratio=0.5, layers=[1], show_progress=False), tokenizer, tmp_path / "folded")
    return tmp_path / "folded"


def snapshot(path) -> dict:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_dry_run_prints_the_card_for_the_repo_and_uploads_nothing(folded_dir):
    code, _, _ = run_cli("eval", folded_dir, "--max-windows", 2, "--seq-len", 32)
    assert code in (0, None)
    before = snapshot(folded_dir)
    code, out, err = run_cli("push", folded_dir, "--repo-id", REPO, "--dry-run")
    assert code in (0, None) and "would push" in err and "dry run" in err
    card = ModelCard(out)
    assert card.data.base_model == "some-org/tiny-llama" and "fold" in card.data.tags
    results = json.loads((folded_dir / "eval_results.json").read_text())["results"][0]
    assert card.data.model_name == REPO and card.data.eval_results[0].metric_value == round(results["perplexity"], 4)
    assert f'from_pretrained("{REPO}", trust_remote_code=True)' in out
    assert snapshot(folded_dir) == before  # the local card keeps its local name


def test_a_dry_run_makes_no_network_call(folded_dir, hub):
    hub.fail = "network"  # any request would fail, and is recorded
    plan = push(folded_dir, REPO, dry_run=True)
    assert hub.requests == [] and "url" not in plan
    card = ModelCard(plan["card"])
    assert card.data.base_model == "some-org/tiny-llama" and card.data.license is None  # not looked up


def test_push_uploads_the_directory_and_its_card_in_one_commit(folded_dir, hub):
    before = snapshot(folded_dir)
    plan = push(folded_dir, REPO, private=True)
    assert plan["commit"] == COMMIT and plan["url"] == f"https://huggingface.co/{REPO}"
    message, uploaded = hub.commit()
    assert message == "Upload with hf-compress"
    assert sorted(uploaded) == sorted(before) == plan["files"]
    assert all(uploaded[name] == before[name] for name in before if name != "README.md")  # weights byte for byte
    card = ModelCard(uploaded["README.md"].decode())
    assert MARKER in card.text and f'from_pretrained("{REPO}", trust_remote_code=True)' in card.text
    assert card.data.base_model == "some-org/tiny-llama" and card.data.license == "mit"  # from the source's metadata
    assert card.data.tags == ["hf-compress", "fold"]
    create = next(r for r in hub.requests if r.url.path == "/api/repos/create")
    assert json.loads(create.content) == {"name": "tiny-folded", "organization": "me", "visibility": "private",
                                          "type": "model"}
    assert create.headers["authorization"] == "Bearer hf_test_token"
    assert snapshot(folded_dir) == before


def test_a_large_push_goes_in_commits_and_an_interrupted_one_resumes(folded_dir, hub):
    before = snapshot(folded_dir)
    hub.fail = "second commit"
    with pytest.raises(HfCompressError, match="check the network connection; rerun the same command to resume"):
        push(folded_dir, REPO, commit_bytes=1)  # one file a commit
    [(message, first)] = hub.commits()
    assert len(first) == 1 and message == f"Upload with hf-compress (1/{len(before) - 1})"  # the card comes last
    hub.fail, sent = None, len(hub.requests)
    plan = push(folded_dir, REPO, commit_bytes=1)
    resumed = [files for _, files in hub.commits()[1:]]
    assert plan["commits"] == len(before) - 1 and len(resumed) == plan["commits"] - 1  # the first is not sent again
    assert not set(first) & {name for files in resumed for name in files}
    assert set(hub.files) == set(before) and all(hub.files[n] == before[n] for n in before if n != "README.md")
    assert "README.md" in resumed[-1] and any(r.url.path.endswith("/revision/main") for r in hub.requests[sent:])
    assert snapshot(folded_dir) == before


def test_a_users_own_card_is_uploaded_as_it_is(folded_dir, hub):
    (folded_dir / "README.md").write_text("# mine\n")
    plan = push(folded_dir, REPO)
    assert plan["own_card"] and plan["files"].count("README.md") == 1
    assert hub.commit()[1]["README.md"] == b"# mine\n"


@pytest.mark.parametrize("failure,message", [
    ("no_token", "no Hugging Face token found: run `hf auth login` or pass --token"),
    ("bad_repo", "'not a repo id' is not a Hub repository id: use 'user/name'"),
    ("network", f"cannot reach the Hugging Face Hub to push to {REPO} (ConnectError: [Errno 111] Connection refused)"),
    ("refused", f"the Hub refused the push to {REPO}: the token cannot write there; run `hf auth login`"),
])
def test_a_failed_push_says_why_and_leaves_the_directory_alone(monkeypatch, capsys, tmp_path, folded_dir, hub,
                                                                failure, message):
    import huggingface_hub

    repo = "not a repo id" if failure == "bad_repo" else REPO
    if failure == "no_token":  # nothing in the environment, nothing stored
        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
        monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    hub.fail = failure
    before = snapshot(folded_dir)
    capsys.readouterr()  # drop what the fixtures printed
    code, _, err = run_cli("push", folded_dir, "--repo-id", repo)
    assert code == 1 and f"error: {message}" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert snapshot(folded_dir) == before
    if failure in ("no_token", "bad_repo"):
        assert hub.requests == []  # refused before any network


def test_offline_push_fails_with_one_line(folded_dir):
    code, _, err = run_cli("push", folded_dir, "--repo-id", REPO)
    assert code == 1 and f"error: cannot push to {REPO} in offline mode" in err and "Traceback" not in err


def test_card_of_a_compressible_directory(tmp_path):
    acip(tiny_model(), tiny_data(), max_steps=4, batch_size=4, show_progress=False).save_pretrained(tmp_path / "c")
    card = model_card(tmp_path / "c", "me/tiny-acip")
    assert "hf download me/tiny-acip --local-dir tiny-acip" in str(card) and "hf-compress materialize" in str(card)
    assert card.data.base_model is None and card.data.tags == ["hf-compress", "acip"]  # built from a config
    (tmp_path / "c" / FACTORS_FILE).unlink()
    with pytest.raises(HfCompressError, match="not a complete compressible directory"):
        model_card(tmp_path / "c", "me/tiny-acip")


@pytest.mark.parametrize("damage,message", [
    ("truncate", "incomplete or corrupt"), ("no_marker", "was not written by hf-compress"),
])
def test_bad_directories_are_refused(folded_dir, damage, message):
    if damage == "truncate":
        weights = folded_dir / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
    else:
        config = json.loads((folded_dir / "config.json").read_text())
        del config["hf_compress"]
        (folded_dir / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli("push", folded_dir, "--repo-id", REPO, "--dry-run")
    assert code == 1 and message in err


def test_the_source_survives_a_compressible_directory(tmp_path):
    from hf_compress import CompressibleModel

    model = tiny_model()
    model.config.name_or_path = "some-org/tiny-llama"
    acip(model, tiny_data(), max_steps=4, batch_size=4, show_progress=False).save_pretrained(tmp_path / "c")
    small = CompressibleModel.from_pretrained(tmp_path / "c").materialize(0.8)
    assert small.config.hf_compress["source"] == "some-org/tiny-llama"


def test_the_source_survives_a_folded_checkpoint(tmp_path):
    model = tiny_model()
    model.config.name_or_path = "some-org/tiny-llama"
    save_checkpoint(fold(model, ratio=0.5, show_progress=False), None, tmp_path / "folded")
    reloaded = load_model(tmp_path / "folded")[0]  # its name_or_path is now a local path
    result = acip(reloaded, tiny_data(), max_steps=2, batch_size=4, show_progress=False)
    assert result.summary["source"] == "some-org/tiny-llama"
