"""The command line: bad input gives one clear line and exit 1, nothing half-written."""

import json
import re
import shutil

import pytest

from conftest import run_cli, tiny_data, tiny_model
from hf_compress import acip
from hf_compress.formats import FACTORS_FILE


@pytest.fixture(scope="module")
def compressible_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("c") / "acip"
    acip(tiny_model(), tiny_data(), max_steps=8, batch_size=4, show_progress=False).save_pretrained(path)
    return path


def error_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in err
    return lines[-1]


def test_materialize_and_info(compressible_dir, tmp_path):
    code, _, err = run_cli("materialize", compressible_dir, "--size-ratio", 0.5,
                       "--output", tmp_path / "m")
    assert code in (0, None) and float(re.search(r"size ratio ([0-9.]+),", err).group(1)) <= 0.5
    code, out, _ = run_cli("info", tmp_path / "m", "--json")
    report = json.loads(out)
    assert report["size_ratio"] <= 0.5 and any(layer["rank"] for layer in report["layers"])
    code, out, _ = run_cli("info", compressible_dir, "--json")
    report = json.loads(out)
    assert [row["size_ratio"] for row in report["sizes"]][-1] == 1.0
    assert 0 < report["smallest_size_ratio"] <= report["sizes"][0]["size_ratio"]  # only sizes it can make


def test_materialize_speed_aware(compressible_dir, tmp_path):
    code, _, err = run_cli("materialize", compressible_dir, "--size-ratio", 0.5,
                           "--speed-aware", "--output", tmp_path / "m")
    assert code in (0, None) and "speed-aware: a second matmul call costs as much as reading" in err
    config = json.loads((tmp_path / "m" / "config.json").read_text())["hf_compress"]
    assert config["speed_overhead_params"] > 0 and config["size_ratio"] <= 0.5
    code, _, err = run_cli("eval", tmp_path / "m", "--speed-aware")
    assert code == 1 and "--speed-aware applies to sizes from a compressible directory" in error_line(err)


@pytest.mark.parametrize("ratio", [0, 1.5, -0.2])
def test_ratio_out_of_range(compressible_dir, tmp_path, ratio):
    code, _, err = run_cli("materialize", compressible_dir, "--size-ratio", ratio,
                       "--output", tmp_path / "m")
    assert code == 1 and "ratio must be in (0, 1]" in error_line(err)
    assert not (tmp_path / "m").exists()


def test_stop_ratio_out_of_range(tmp_path):
    code, _, err = run_cli("compress", "demo", "--output", tmp_path / "c", "--stop-ratio", 1)
    assert code == 1 and "ratio must be in (0, 1)" in error_line(err)


def test_unknown_model(tmp_path):
    code, _, err = run_cli("compress", "no-such-org/no-such-model", "--output", tmp_path / "c")
    assert code == 1 and "cannot load model 'no-such-org/no-such-model'" in error_line(err)
    assert list(tmp_path.iterdir()) == []


def test_not_a_compressible_directory(tmp_path):
    code, _, err = run_cli("materialize", tmp_path, "--size-ratio", 0.5, "--output", tmp_path / "m")
    assert code == 1 and "is not a compressible directory" in error_line(err)


def test_half_written_compressible_directory(compressible_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(compressible_dir, broken)
    data = (broken / FACTORS_FILE).read_bytes()
    (broken / FACTORS_FILE).write_bytes(data[: len(data) // 2])
    code, _, err = run_cli("materialize", broken, "--size-ratio", 0.5, "--output", tmp_path / "m")
    assert code == 1 and "not a complete compressible directory" in error_line(err)
    assert not (tmp_path / "m").exists()


def test_existing_output_needs_overwrite(compressible_dir, tmp_path):
    (tmp_path / "m").mkdir()
    code, _, err = run_cli("materialize", compressible_dir, "--size-ratio", 0.5, "--output", tmp_path / "m")
    assert code == 1 and "already exists; pass --overwrite" in error_line(err)
    code, _, _ = run_cli("materialize", compressible_dir, "--size-ratio", 0.5, "--output",
                     tmp_path / "m", "--overwrite")
    assert code in (0, None) and (tmp_path / "m" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary leftovers


def test_overwrite_replaces_only_what_hf_compress_wrote(compressible_dir, tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    tiny_model().save_pretrained(mine / "model")  # a checkpoint, but not one of ours
    for output in (mine, mine / "model", "."):
        monkeypatch.chdir(mine)
        code, _, err = run_cli("materialize", compressible_dir, "--size-ratio", 0.5, "--output", output, "--overwrite")
        assert code == 1 and "was not written by hf-compress, so --overwrite does not replace it" in error_line(err)
    assert (mine / "notes.txt").read_text() == "keep me" and (mine / "model" / "config.json").is_file()
    code, _, _ = run_cli("fold", mine / "model", "--ratio", 0.5, "--layers", "all", "--output", mine / "folded")
    code, _, _ = run_cli("fold", mine / "model", "--ratio", 0.75, "--layers", "all", "--output", mine / "folded",
                         "--overwrite")  # ours: replaced
    assert code in (0, None) and json.loads((mine / "folded" / "config.json").read_text())["intermediate_size"] == 72
    shutil.copytree(compressible_dir, mine / "pass")  # a compressible directory is ours too
    code, _, err = run_cli("materialize", compressible_dir, "--size-ratio", 0.5, "--output", mine / "pass", "--overwrite")
    assert code in (0, None) and not (mine / "pass" / FACTORS_FILE).exists(), err


def test_fold_with_per_block_ratios(tmp_path):
    tiny_model().save_pretrained(tmp_path / "tiny")
    code, _, err = run_cli("fold", tmp_path / "tiny", "--ratio", 0.5, "--layers", "0=0.75,1",
                       "--output", tmp_path / "folded")
    assert code in (0, None) and "trust_remote_code" in err
    shapes = json.loads((tmp_path / "folded" / "config.json").read_text())["hf_compress"]["shapes"]
    assert shapes["model.layers.0.mlp.up_proj"] == [64, 72] and shapes["model.layers.1.mlp.up_proj"] == [64, 48]


def test_fold_bad_layers(tmp_path):
    tiny_model().save_pretrained(tmp_path / "tiny")
    code, _, err = run_cli("fold", tmp_path / "tiny", "--ratio", 0.5, "--layers", "first",
                       "--output", tmp_path / "folded")
    assert code == 1 and "--layers takes" in error_line(err) and not (tmp_path / "folded").exists()
