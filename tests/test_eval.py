"""`hf-compress eval`: perplexity, a real lm-eval run on a local task, JSON results, the plot."""

import json
import sys

import pytest

from conftest import tiny_data, tiny_model
from hf_compress import acip
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


def run(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["hf-compress", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code


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
    assert 0 <= record["tasks"]["tiny_choice"]["acc"] <= 1
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


def test_builtin_lm_eval_task_is_offline_and_real(workspace, tokenizer):
    from hf_compress.evaluate import BUILTIN_TASK, lm_eval_tasks

    metrics = lm_eval_tasks(tiny_model(), tokenizer, [BUILTIN_TASK], limit=8)[BUILTIN_TASK]
    assert set(metrics) == {"acc", "acc_norm"} and 0 <= metrics["acc"] <= 1


@pytest.mark.parametrize("args,message", [
    (["--size-ratios", "0.5,x"], "comma-separated numbers"),
    (["--size-ratios", "0.5,1.5"], "ratio must be in (0, 1]"),
    (["--tasks", "no_such_task_anywhere", "--no-perplexity"], "unknown lm-eval task"),
    (["--no-perplexity"], "nothing to evaluate"),
])
def test_bad_eval_input(monkeypatch, capsys, workspace, args, message):
    assert run(monkeypatch, "eval", workspace / "acip", *args) == 1
    assert message in capsys.readouterr().err
