"""Every command's output is a valid input of the next, read back from disk through the CLI:
fold or prune (each schedule) -> compress -> materialize -> quantize -> eval / info / push, or one clear
sentence saying why not."""

import json

import pytest

from conftest import ok, refused, tiny_model

pytestmark = pytest.mark.slow

# No LoRA: size 1.0 is then the input exactly, and 300KB in nf4 fits this tiny model (LoRA stacked and
# rounded to nf4's widths would not); the demo's integration tests materialize with the default LoRA.
SMALL_PASS = ("--max-steps", 4, "--seq-len", 32, "--batch-size", 4, "--save-every", 100, "--lora-rank", 0)
SMALL_EVAL = ("--max-windows", 2, "--seq-len", 32)


@pytest.fixture(scope="module")
def source(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("src") / "tiny"
    model = tiny_model()
    model.config.name_or_path = "some-org/tiny-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def check_consumers(path, tmp_path, quantized=False):
    """info, eval and push --dry-run accept `path` as written on disk."""
    report = json.loads(ok("info", path, "--json")[0])
    assert report["model_bytes"] > 0 and (report["quantization"] is not None) == quantized
    ok("eval", path, *SMALL_EVAL)
    assert (path / "eval_results.json").is_file()
    out, _ = ok("push", path, "--repo-id", "me/tiny", "--dry-run")
    assert "hf-compress" in out
    return report


SHRINKS = {"fold": (), "prune": ("--seq-len", 32, "--windows", 4)}


@pytest.mark.parametrize("command,layers", [("fold", "global"), ("fold", "all"), ("fold", "0=0.75,1"),
                                            ("prune", "all")])  # prune per block shares fold's per-layer path
def test_shrink_compress_materialize_quantize(source, tmp_path, command, layers):
    folded, compressible = tmp_path / "folded", tmp_path / "acip"
    ok(command, source, "--ratio", 0.5, "--layers", layers, "--output", folded, *SHRINKS[command])
    shrunk = check_consumers(folded, tmp_path)
    (shrunk_record,) = json.loads((folded / "eval_results.json").read_text())["results"]
    ok("compress", folded, "--output", compressible, *SMALL_PASS)
    sizes = json.loads(ok("info", compressible, "--json")[0])
    assert sizes["target_dense_params"] == shrunk["target_params"]  # the pass ranks the shrunk layers
    params = [row["target_params"] for row in sizes["sizes"]]
    assert params == sorted(params) and params[-1] == shrunk["target_params"]
    ok("eval", compressible, "--size-ratios", "0.5,1.0", *SMALL_EVAL)
    half, whole = json.loads((compressible / "eval_results.json").read_text())["results"]
    assert half["target_params"] < whole["target_params"]
    assert whole["perplexity"] == pytest.approx(shrunk_record["perplexity"], rel=1e-4)  # size 1.0 is the input
    ok("materialize", compressible, "--size-ratio", 0.6, "--output", tmp_path / "m")
    report = check_consumers(tmp_path / "m", tmp_path)
    assert report["source_params"] == sum(p.numel() for p in tiny_model().parameters())
    ok("quantize", tmp_path / "m", "--method", "int8", "--output", tmp_path / "q")
    check_consumers(tmp_path / "q", tmp_path, quantized=True)
    ok("materialize", compressible, "--max-size", "300KB", "--quantize", "nf4",
       "--output", tmp_path / "mq")
    report = check_consumers(tmp_path / "mq", tmp_path, quantized=True)
    assert report["file_bytes"] <= 300_000 and report["other_bytes"] > 0  # weight files on disk, headers included


def test_fold_then_quantize(source, tmp_path):
    ok("fold", source, "--ratio", 0.7, "--layers", "all", "--output", tmp_path / "f")
    ok("quantize", tmp_path / "f", "--method", "nf4", "--output", tmp_path / "q")
    check_consumers(tmp_path / "q", tmp_path, quantized=True)
    _, err = ok("fold", source, "--ratio", 0.7, "--quantize", "fp4", "--output", tmp_path / "fq")
    assert "fp4" in err
    check_consumers(tmp_path / "fq", tmp_path, quantized=True)


def test_what_cannot_compose_says_why(source, tmp_path):
    compressible = tmp_path / "acip"
    ok("compress", source, "--output", compressible, *SMALL_PASS)
    ok("materialize", compressible, "--size-ratio", 0.5, "--output", tmp_path / "m")
    assert "cannot compress a model with factorized (ACIP) layers" in refused(
        "compress", tmp_path / "m", "--output", tmp_path / "again", *SMALL_PASS)
    assert "cannot fold a model with factorized" in refused(
        "fold", tmp_path / "m", "--ratio", 0.5, "--output", tmp_path / "f")
    ok("quantize", source, "--method", "nf4", "--output", tmp_path / "q")
    for command in (("compress", tmp_path / "q", "--output", tmp_path / "c2", *SMALL_PASS),
                    ("fold", tmp_path / "q", "--ratio", 0.5, "--output", tmp_path / "f2"),
                    ("quantize", tmp_path / "q", "--output", tmp_path / "q2")):
        assert "quantized" in refused(*command)
    assert "exactly one of --size-ratio, --max-size and --max-loss-increase" in refused(
        "materialize", compressible, "--output", tmp_path / "x")
    assert "size must look like" in refused(
        "materialize", compressible, "--max-size", "lots", "--output", tmp_path / "x")
    assert "quantization must be one of" in refused(
        "materialize", compressible, "--size-ratio", 0.5, "--quantize", "int4",
        "--output", tmp_path / "x")
    assert not (tmp_path / "x").exists() and not (tmp_path / "again").exists()


def test_every_command_that_reads_text_honours_every_dataset_option(source, tmp_path):
    """A file whose text is in column 'body': each command fails with "no column 'text'" unless it
    passes --text-column on (the loss-budget searches once ignored it)."""
    from hf_compress.data import builtin_text

    data = tmp_path / "a.jsonl"
    data.write_text("\n".join(json.dumps({"body": chunk}) for chunk in builtin_text()[:60_000].split("\n\n")))
    text = ("--dataset", data, "--text-column", "body", "--seq-len", 32)
    compressible = tmp_path / "acip"
    ok("compress", source, "--output", compressible, *text, "--max-steps", 2, "--save-every", 100)
    ok("materialize", compressible, "--max-loss-increase", 0.5, *text, "--windows", 2, "--output", tmp_path / "m")
    ok("eval", compressible, "--size-ratios", "auto", "--max-loss-increase", 0.5, *text, "--max-windows", 2)
    ok("prune", source, "--ratio", 0.5, *text, "--windows", 4, "--output", tmp_path / "p")
    assert "no column 'text'" in refused("eval", tmp_path / "m", "--dataset", data, "--seq-len", 32)


def test_dtype_and_device_on_every_command(monkeypatch, source, tmp_path):
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)  # `--device cpu` sets it: restored afterwards
    compressible = tmp_path / "acip"
    ok("compress", source, "--output", compressible, "--dtype", "bfloat16", "--device", "cpu",
       *SMALL_PASS)
    ok("materialize", compressible, "--size-ratio", 0.6, "--dtype", "bfloat16",
       "--device", "cpu", "--output", tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
    ok("fold", source, "--ratio", 0.5, "--dtype", "bfloat16", "--output", tmp_path / "f")
    assert json.loads((tmp_path / "f" / "config.json").read_text())["dtype"] == "bfloat16"
    out, _ = ok("eval", tmp_path / "m", "--dtype", "float32", "--device", "cpu", *SMALL_EVAL)
    assert "perplexity" in out
    assert "unknown device" in refused("eval", tmp_path / "m", "--device", "tpu9", *SMALL_EVAL)
    assert "dtype must be one of" in refused("eval", tmp_path / "m", "--dtype", "int3")
    assert "--device takes only cpu or auto" in refused(
        "compress", source, "--output", tmp_path / "c2", "--device", "cuda:1")
