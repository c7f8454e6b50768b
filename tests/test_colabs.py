"""Executes every notebook in colabs/ top to bottom (FLEXVISION_NOTEBOOK_FAST=1) so none can rot.

Each notebook ends with a cell of asserts on its own results (parity after import, identities of
the PI-resize, reloaded-checkpoint evals equal to the final eval, ...), so a notebook that runs
but computes the wrong thing fails here too. The kernel is the interpreter running pytest, with
the repository first on its path; everything a notebook writes goes to a tmp directory.
"""

import json
import os
import pathlib
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = pathlib.Path(__file__).resolve().parents[1]
COLABS = REPO / "colabs"
NOTEBOOKS = sorted(COLABS.glob("*.ipynb"))
EXPECTED = {"quickstart.ipynb", "pi_resize.ipynb", "train_and_evaluate.ipynb",
            "checkpoints.ipynb", "maskrcnn_nuclei.ipynb"}


def test_expected_notebooks_exist():
    assert EXPECTED <= {path.name for path in NOTEBOOKS}, sorted(p.name for p in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_clean(path):
    """nbformat v4, a markdown cell first, an install cell next, no outputs."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    install = nb.cells[1]
    assert install.cell_type == "code" and 'find_spec("flexvision") is None' in install.source
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name} has outputs"


def _kernelspec(root: pathlib.Path) -> None:
    """A 'python3' kernelspec for this interpreter, found first through JUPYTER_PATH."""
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (flexvision tests)", "language": "python"}))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
    _kernelspec(tmp_path / "jupyter")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    workdir = tmp_path / "workdir"
    # No FLEXVISION_REPO: the notebooks find configs/ and experiments/ from the imported
    # package, as on a fresh clone after `pip install -e .`.
    python_path = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {k: v for k, v in os.environ.items() if k != "FLEXVISION_REPO"}
    env.update(FLEXVISION_NOTEBOOK_FAST="1", FLEXVISION_NOTEBOOK_WORKDIR=str(workdir),
               PYTHONPATH=os.pathsep.join(python_path), JAX_PLATFORMS="cpu",
               TF_CPP_MIN_LOG_LEVEL="2")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    client.execute(env=env, cwd=str(tmp_path))
    print(f"{path.name}: {time.perf_counter() - start:.1f} s")
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    final = "".join(out.get("text", "") for out in nb.cells[-1].outputs)
    assert "all checks passed" in final, final
    leftovers = {p.name for p in COLABS.iterdir()} - {p.name for p in NOTEBOOKS} - {"README.md"}
    assert not leftovers, f"the notebook wrote into the repository: {sorted(leftovers)}"
