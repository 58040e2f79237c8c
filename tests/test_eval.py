"""`hf-compress eval`: perplexity, a real lm-eval run on a local task, JSON results, the plot."""

import json
import math
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import tiny_data, tiny_model
from hf_compress import HfCompressError, acip
from hf_compress.checkpoint import save_checkpoint
from hf_compress.cli import main
from hf_compress.data import builtin_text

TASK_YAML = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("eval")
    model = tiny_model()
    save_checkpoint(model, tokenizer, root / "model")
    compressible = acip(model, tiny_data(), max_steps=8, batch_size=4, show_progress=False)
    compressible.tokenizer = tokenizer
    compressible.save_pretrained(root / "acip")
    (root / "text.txt").write_text(builtin_text()[:30_000])
    tasks = root / "tasks"
    tasks.mkdir()
    rows = [{"question": f"the {w}", "choices": ["of the", "class", "is"], "label": i % 3}
            for i, w in enumerate(["object", "value", "name", "list", "file", "type"])]
    (tasks / "tiny.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tasks / "tiny.yaml").write_text(TASK_YAML.format(data=json.dumps(str(tasks / "tiny.jsonl"))))
    return root


@torch.no_grad()
def expected_accuracy(workspace) -> float:
    """tiny_choice scored by hand: a document is right when its label's continuation (" " + choice)
    is the likeliest after its question, as lm-eval's multiple_choice scores it."""
    model = AutoModelForCausalLM.from_pretrained(workspace / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(workspace / "model")
    right = []
    for line in (workspace / "tasks" / "tiny.jsonl").read_text().splitlines():
        doc = json.loads(line)
        context = tokenizer(doc["question"]).input_ids
        scores = []
        for choice in doc["choices"]:
            continuation = tokenizer(doc["question"] + " " + choice).input_ids[len(context):]
            ids = torch.tensor([context + continuation])
            logprobs = model(ids[:, :-1]).logits.log_softmax(-1)[0, len(context) - 1:]
            scores.append(logprobs.gather(1, torch.tensor(continuation)[:, None]).sum().item())
        right.append(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    return sum(right) / len(right)


def run(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["hf-compress", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code


@pytest.mark.slow
def test_model_perplexity_and_local_lm_eval_task(monkeypatch, workspace, tmp_path):
    code = run(monkeypatch, "eval", workspace / "model", "--dataset", workspace / "text.txt", "--seq-len", 32,
               "--tasks", "tiny_choice", "--include-path", workspace / "tasks", "--output", tmp_path / "r.json")
    assert code in (0, None)
    result = json.loads((tmp_path / "r.json").read_text())
    assert set(result) == {"model", "protocol", "versions", "results", "model_index"}
    assert result["protocol"]["perplexity"]["seq_len"] == 32 and result["protocol"]["perplexity"]["tokens"] > 0
    assert {"torch", "transformers", "lm_eval"} <= set(result["versions"])
    (record,) = result["results"]
    assert record["size_ratio"] == 1.0 and record["perplexity"] > 1
    assert record["tasks"]["tiny_choice"]["acc"] == pytest.approx(expected_accuracy(workspace))
    assert json.loads((workspace / "model" / "eval_results.json").read_text()) == result
    (entry,) = result["model_index"]
    assert {r["task"]["name"] for r in entry["results"]} == {"Perplexity", "tiny_choice"}
    assert all(m["type"] and isinstance(m["value"], float) for r in entry["results"] for m in r["metrics"])


def test_sweep_of_a_compressible_directory_and_plot(monkeypatch, workspace, tmp_path):
    code = run(monkeypatch, "eval", workspace / "acip", "--size-ratios", "0.5,0.7,1.0", "--dataset",
               workspace / "text.txt", "--seq-len", 32, "--output", tmp_path / "r.json", "--plot", tmp_path / "c.png")
    assert code in (0, None)
    records = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [round(r["size_ratio"], 1) for r in records] == [0.5, 0.7, 1.0]
    assert records[0]["target_params"] < records[1]["target_params"] < records[2]["target_params"]
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_builtin_lm_eval_task_runs_as_the_harness_runs_papers_tasks(workspace, tokenizer):
    import copy

    from hf_compress.evaluate import BUILTIN_TASK, TaskOptions, lm_eval_tasks

    model = tiny_model()
    results, harness = lm_eval_tasks(model, tokenizer, [BUILTIN_TASK], TaskOptions(limit=8))
    metrics = results[BUILTIN_TASK]
    assert set(metrics) == {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr"}
    p = metrics["acc"]
    assert (p * 8) == pytest.approx(round(p * 8))  # a fraction of the 8 documents
    assert metrics["acc_stderr"] == pytest.approx((p * (1 - p) / 7) ** 0.5)  # the sample mean's standard error
    assert harness == {"n_shot": {BUILTIN_TASK: 0}, "chat_template": None}
    chatty = copy.deepcopy(tokenizer)
    chatty.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    results, harness = lm_eval_tasks(model, chatty, [BUILTIN_TASK],
                                     TaskOptions(limit=8, num_fewshot=2, apply_chat_template=True, batch_size="auto"))
    assert harness == {"n_shot": {BUILTIN_TASK: 2}, "chat_template": chatty.chat_template}
    assert set(results[BUILTIN_TASK]) == set(metrics)
    with pytest.raises(HfCompressError, match="needs a tokenizer with a chat template"):
        lm_eval_tasks(model, tokenizer, [BUILTIN_TASK], TaskOptions(limit=8, apply_chat_template=True))


@pytest.mark.parametrize("args,message", [
    (["--size-ratios", "0.5,x"], "comma-separated numbers"),
    (["--size-ratios", "0.5,1.5"], "ratio must be in (0, 1]"),
    (["--tasks", "no_such_task_anywhere", "--no-perplexity"], "unknown lm-eval task"),
    (["--no-perplexity"], "nothing to evaluate"),
])
def test_bad_eval_input(monkeypatch, capsys, workspace, args, message):
    assert run(monkeypatch, "eval", workspace / "acip", *args) == 1
    assert message in capsys.readouterr().err


def test_description_length_adds_the_text_bits_to_the_model_bits(monkeypatch, workspace, tmp_path):
    code = run(monkeypatch, "eval", workspace / "model", "--dataset", workspace / "text.txt", "--seq-len", 32,
               "--output", tmp_path / "r.json")
    assert code in (0, None)
    result = json.loads((tmp_path / "r.json").read_text())
    (record,) = result["results"]
    text_bits = math.log(record["perplexity"]) * result["protocol"]["perplexity"]["tokens"] / math.log(2)
    assert record["description_length_bits"] == pytest.approx(text_bits + 8 * record["model_bytes"])
    assert 0.5 < record["bits_per_byte"] < 8


def test_loss_budget_search_finds_the_smallest_size_that_fits(workspace, tokenizer):
    from hf_compress import CompressibleModel, calibration_data

    compressible = CompressibleModel.from_pretrained(workspace / "acip")
    windows = calibration_data(tokenizer, str(workspace / "text.txt"), seq_len=32, max_windows=6)
    ratio, search = compressible.ratio_within_loss(windows, 0.01)
    tries = {t["size_ratio"]: t for t in search["tries"]}
    assert tries[ratio]["fits"] and tries[ratio]["loss"] <= search["limit"] == pytest.approx(1.01 * search["dense_loss"])
    assert ratio == 0.01 or not tries[round(ratio - 0.01, 6)]["fits"]  # the next size down was tried and failed
    assert len(tries) <= 8  # a binary search over 100 sizes
    loose, _ = compressible.ratio_within_loss(windows, 0.5)
    assert loose <= ratio


def test_materialize_and_eval_by_loss_budget(monkeypatch, workspace, tmp_path):
    from transformers import AutoModelForCausalLM

    data = ["--dataset", workspace / "text.txt", "--seq-len", 32]
    code = run(monkeypatch, "materialize", workspace / "acip", "--max-loss-increase", 0.05, *data, "--windows", 4,
               "--output", tmp_path / "m")
    assert code in (0, None)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True)
    budget = model.config.hf_compress["loss_budget"]
    assert budget["max_increase"] == 0.05 and budget["windows"] == 4 and budget["tries"]
    chosen = [t["size_ratio"] for t in budget["tries"] if t["fits"]]
    assert model.config.hf_compress["size_ratio"] <= min(chosen) + 1e-6
    assert "the smallest size whose loss stays within 5.0%" in (tmp_path / "m" / "README.md").read_text()
    code = run(monkeypatch, "eval", workspace / "acip", "--size-ratios", "auto", "--max-loss-increase", 0.05, *data,
               "--output", tmp_path / "r.json")
    assert code in (0, None)
    (record,) = json.loads((tmp_path / "r.json").read_text())["results"]
    assert record["size_ratio"] <= 1.0


def test_materialize_takes_exactly_one_size(monkeypatch, capsys, workspace, tmp_path):
    code = run(monkeypatch, "materialize", workspace / "acip", "--size-ratio", 0.5, "--max-loss-increase", 0.02,
               "--output", tmp_path / "m")
    assert code == 1 and "exactly one of" in capsys.readouterr().err and not (tmp_path / "m").exists()
