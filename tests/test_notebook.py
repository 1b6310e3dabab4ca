"""Executes experiments/scaling_curves.ipynb, with a kernel from this venv, on the results of a micro sweep."""
import os
import shutil

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = os.path.join(os.path.dirname(__file__), os.pardir, "experiments", "scaling_curves.ipynb")
ANALYSIS_FILES = ("scaling.md", "fits.json", "reward_vs_sqrt_kl.png", "proxy_vs_gold.png", "slope_vs_size.png",
                  "methods.md", "methods_frontier.png")


@pytest.fixture
def results_dir(micro_sweep_dir, tmp_path):
  """A copy of the results of a real micro sweep (conftest): the notebook writes its analysis there."""
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  shutil.copy(os.path.join(micro_sweep_dir, "results.jsonl"), run_dir / "results.jsonl")
  shutil.copytree(os.path.join(micro_sweep_dir, "evals_xs"), run_dir / "evals_xs")
  return run_dir


def test_notebook_is_stored_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [cell for cell in nb.cells if cell.cell_type == "code"]
  assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)
  assert "RUN_DIR" in code[0].source and "RLHF_JAX_RESULTS_DIR" in code[0].source


def test_notebook_executes_on_a_results_dir(results_dir, micro_online_dir, tmp_path, monkeypatch):
  monkeypatch.setenv("RLHF_JAX_RESULTS_DIR", str(results_dir))
  monkeypatch.setenv("RLHF_JAX_ONLINE_DIR", str(micro_online_dir))
  # Kernel connection files and IPython's profile in tmp: nothing written to the home directory.
  monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter_runtime"))
  monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError on the first failing cell
  outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
  assert not [out for out in outputs if out.output_type == "error"]
  images = [out for out in outputs if "image/png" in out.get("data", {})]
  # three analysis figures, the interactive gap plot, the methods' frontier, three evaluation and two online figures
  assert len(images) == 10
  assert any("text/markdown" in out.get("data", {}) and "| size | params |" in out["data"]["text/markdown"]
             for out in outputs)
  assert any("text/markdown" in out.get("data", {}) and "| size | method | seeds | common KL | gold @ common KL |" in out["data"]["text/markdown"]
             for out in outputs)
  assert any("text/markdown" in out.get("data", {}) and "| after - before |" in out["data"]["text/markdown"]
             for out in outputs)
  assert any("text/markdown" in out.get("data", {}) and "| PM acc on policy |" in out["data"]["text/markdown"]
             for out in outputs)
  for name in ANALYSIS_FILES:
    path = results_dir / "analysis" / name
    assert path.is_file() and path.stat().st_size > 0, name
