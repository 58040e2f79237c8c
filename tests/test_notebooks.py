"""The notebooks in notebooks/ run from top to bottom on the demo model, offline, with their
default (small) settings, in a kernel that runs this very interpreter."""

import json
import os
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"
KERNEL = "hf-compress-tests"
# What the last code cell of each notebook prints once everything before it worked.
LAST_OUTPUT = {
    "quickstart": ["same logits as the in-memory model: True", "dense: The for statement in Python"],
    "folding": ["with plain transformers; same logits: True", "generated: The for statement in Python"],
}

# Settings the test changes, for time: every cell still runs.
UNDER_TEST = {"quickstart": "SIZES = (0.6,); MAX_STEPS = 4; WHITENING_WINDOWS = 4"}


@pytest.fixture(scope="module")
def jupyter_path(tmp_path_factory):
    """A kernelspec for sys.executable: the `python3` kernel a machine has may belong to
    another interpreter (a user-wide kernelspec wins over the one inside the venv)."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "hf-compress tests", "language": "python",
    }))
    return root


def test_notebooks_are_stored_without_outputs():
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert {p.stem for p in paths} >= set(LAST_OUTPUT)
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name} has outputs"


def stream_text(cell) -> str:
    return "".join(out.get("text", "") for out in cell.outputs if out.output_type == "stream")


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(LAST_OUTPUT))
def test_notebook_runs_to_the_end(name, jupyter_path, tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks' checkpoints go to a temporary directory
    # OpenMP threads that spin while they wait make torch's SVDs ~10x slower when other processes
    # share the cores (a busy CI runner); sleeping instead costs nothing on an idle machine.
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    if name in UNDER_TEST:  # after the settings cell, as a user who edits it would
        nb.cells.insert(next(i for i, c in enumerate(nb.cells) if c.cell_type == "code") + 1,
                        nbformat.v4.new_code_cell(UNDER_TEST[name]))
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name=KERNEL,
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    client.execute()
    print(f"{name}.ipynb ran in {time.perf_counter() - start:.0f} s")
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code)
    last = stream_text(code[-1])
    for expected in LAST_OUTPUT[name]:
        assert expected in last, last
    assert list(tmp_path.glob(f"hf-compress-{name}-*/*/model.safetensors")), "no checkpoint written"
    images = [out for cell in code for out in cell.outputs if "image/png" in out.get("data", {})]
    assert images, "the plot was not shown inline"
