"""End to end on the bundled demo model (SmolLM2-135M) with the builtin corpus, via the CLI (run in
this process; every checkpoint is reloaded in a fresh one)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ok

pytestmark = pytest.mark.integration
RATIOS = (0.8, 0.4)


def generate_without_hf_compress(path: Path, remote_code: bool = True, check: str = "") -> str:
    """Text the checkpoint at `path` generates in a fresh process with only torch and transformers
    (`check`: a line of Python run on `model` first)."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["hf_compress"] = None
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained("{path}")
        model = AutoModelForCausalLM.from_pretrained("{path}", trust_remote_code={remote_code})
        {check}
        ids = tok("The for statement in Python", return_tensors="pt").input_ids
        new = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
        print(tok.decode(new, skip_special_tokens=True))
    """)
    done = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True,
                          cwd=path.parent, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    return done.stdout.strip()


@pytest.fixture(scope="module")
def compressible(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "acip"
    ok("compress", "demo", "--output", out, "--max-steps", 10, "--seq-len", 64, "--batch-size", 4,
        "--save-every", 5)  # LoRA 8 by default: merged and stacked at every size below
    return out


def test_pass_summary(compressible):
    meta = json.loads((compressible / "acip.json").read_text())
    assert meta["summary"]["steps"] <= 10 and len(meta["layers"]) == 210


@pytest.mark.parametrize("ratio", RATIOS)
def test_materialize_reload_in_fresh_process_and_generate(compressible, tmp_path, ratio):
    out = tmp_path / f"m{ratio}"
    ok("materialize", compressible, "--size-ratio", ratio, "--output", out)
    report = json.loads(ok("info", out, "--json")[0])
    # At or below the ratio, and below it by at most one kept value of the widest layer.
    assert ratio - 2112 / report["target_dense_params"] <= report["size_ratio"] <= ratio
    assert generate_without_hf_compress(out)


def test_eval_sweep_with_the_builtin_lm_eval_task(compressible, tmp_path):
    out, _ = ok("eval", compressible, "--size-ratios", "0.6,1.0", "--max-windows", 2, "--tasks", "pydoc_cloze",
                "--limit", 12, "--num-fewshot", 1, "--apply-chat-template", "--batch-size", 4,
                "--output", tmp_path / "r.json", "--plot", tmp_path / "c.png")
    document = json.loads((tmp_path / "r.json").read_text())
    small, full = document["results"]
    assert full["perplexity"] < small["perplexity"]
    assert 0 <= small["tasks"]["pydoc_cloze"]["acc"] <= 1 and small["tasks"]["pydoc_cloze"]["acc_stderr"] > 0
    assert small["lm_eval"]["n_shot"] == {"pydoc_cloze": 1} and "im_start" in small["lm_eval"]["chat_template"]
    assert document["protocol"]["tasks"] | {"include_path": None} == {
        "names": ["pydoc_cloze"], "include_path": None, "limit": 12, "num_fewshot": 1, "apply_chat_template": True,
        "batch_size": 4}
    assert " ± " in out  # the table shows standard errors
    assert (tmp_path / "c.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def folded(tmp_path_factory):
    """The demo folded to 0.9 by the default (global) schedule and by every block alike."""
    root = tmp_path_factory.mktemp("folded")
    for layers in ("global", "all"):
        ok("fold", "demo", "--ratio", 0.9, "--layers", layers, "--output", root / layers)
    return root


def test_fold_demo_reload_without_remote_code_and_generate(folded):
    out = folded / "all"
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] == 1382 and "auto_map" not in config
    report = json.loads(ok("info", out, "--json")[0])
    assert 0.9 < report["size_ratio"] < 0.95
    assert generate_without_hf_compress(out, remote_code=False)


def test_the_global_allocation_beats_folding_every_block_alike(folded):
    """The default fold (measured 15.7 against 437 on 4 test windows, docs/BENCHMARKS.md)."""
    import hf_compress as hfc
    from hf_compress.evaluate import perplexity

    default, tokenizer = hfc.load_model(str(folded / "global"))
    uniform, _ = hfc.load_model(str(folded / "all"))
    heldout = hfc.calibration_data(tokenizer, "builtin:pydoc", seq_len=256, split="test", max_windows=2)
    sizes = default.config.hf_compress["size_ratio"], uniform.config.hf_compress["size_ratio"]
    assert abs(sizes[0] - sizes[1]) < 1e-3 and max(sizes) < 0.95  # one budget, rounded per block
    assert default.config.hf_compress["shapes"] and not uniform.config.hf_compress["shapes"]
    assert 5 * perplexity(default, heldout)["perplexity"] < perplexity(uniform, heldout)["perplexity"]


def test_quantized_size_within_a_byte_budget_reloads_without_hf_compress(compressible, tmp_path):
    out = tmp_path / "nf4"
    _, err = ok("materialize", compressible, "--max-size", "150MiB", "--quantize", "nf4", "--output", out)
    assert "the largest within 150MiB" in err
    report = json.loads(ok("info", out, "--json")[0])
    assert report["file_bytes"] <= 150 * 2**20 and report["quantization"]["method"] == "nf4"
    assert report["width_multiple"] == 64
    factors = 'assert any(type(getattr(m, "proj_in", None)).__name__ == "Linear4bit" for m in model.modules())'
    assert generate_without_hf_compress(out, check=factors)
    ok("eval", out, "--max-windows", 1, "--seq-len", 128)
    card = (out / "README.md").read_text()
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in card and "nf4" in card and "perplexity" in card.lower()


def test_demo_fold_compress_materialize_quantize_from_disk(folded, tmp_path):
    ok("compress", folded / "global", "--output", tmp_path / "fc", "--max-steps", 3, "--seq-len", 64,
        "--include", r"layers\.[0-3]\..*_proj$")  # a few blocks: the composition is the point
    report = json.loads(ok("info", tmp_path / "fc", "--json")[0])
    assert report["target_dense_params"] > 0
    ok("materialize", tmp_path / "fc", "--size-ratio", 0.7, "--quantize", "int8", "--output", tmp_path / "m")
    ok("eval", tmp_path / "m", "--max-windows", 1, "--seq-len", 128, "--output", tmp_path / "r.json")
    record = json.loads((tmp_path / "r.json").read_text())["results"][0]
    assert record["quantization"] == "int8" and record["perplexity"] < 1e4
    assert record["model_bytes"] < 0.5 * json.loads((tmp_path / "m" / "config.json").read_text())[
        "hf_compress"]["source_bytes"]


def test_memory_plan_is_within_15_percent_of_the_measured_peaks_on_the_demo(tmp_path):
    """bench/scale.py measures each stage's peak resident memory during a real pass on the demo."""
    bench = Path(__file__).parents[1] / "bench" / "scale.py"
    subprocess.run([sys.executable, str(bench), "--model", "demo", "--steps", "1", "--seq-len", "128",
                    "--whitening-windows", "8", "--output", str(tmp_path)], check=True, capture_output=True)
    report = json.loads((tmp_path / "scale_demo.json").read_text())
    assert set(report["stages"]) == {"whitening + SVD", "pass", "materialize"}
    for stage, row in report["stages"].items():
        assert 0.85 <= row["measured_over_planned"] <= 1.15, (stage, row)
