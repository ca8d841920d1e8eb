"""Every notebook in notebooks/ runs headless from top to bottom without an error and draws at least one figure.

The notebooks are stored without outputs; here each one is executed in a fresh ``python3`` kernel from
this environment (ipykernel, from the ``dev`` extra) on the ``cpu`` backend, with matplotlib on Agg.
"""
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 300


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",   # the kernel of this environment (jupyter_client runs it with sys.executable)
        timeout=CELL_TIMEOUT_S,
        allow_errors=False,
        resources={"metadata": {"path": str(path.parent)}},   # the notebook's folder as working directory
    )
    env = dict(os.environ, GPU_CNN_BACKEND="cpu", MPLBACKEND="Agg", PYTHONWARNINGS="ignore::DeprecationWarning")
    env.pop("NUMBA_ENABLE_CUDASIM", None)   # the backend variable decides; the test process may have set it
    try:
        client.execute(env=env)
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"{path.name} failed:\n{err}")

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, f"{path.name}: {errors[0].ename}: {errors[0].evalue}"
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert pngs, f"{path.name} drew no figure (no image/png output)"
    texts = [o.get("text", "") for o in outputs if o.output_type == "stream"]
    texts += [o.get("data", {}).get("text/plain", "") for o in outputs if o.output_type in ("execute_result", "display_data")]
    for text in texts:  # no warnings, and no figure that shows up as its repr instead of a picture
        assert "Warning" not in text and "warn" not in text.lower(), f"{path.name}: {text[:300]}"
        assert "<Figure size" not in text, f"{path.name}: a figure was not drawn: {text[:200]}"
    assert not [o for o in outputs if o.output_type == "stream" and o.name == "stderr"], f"{path.name} wrote to stderr"
    if path.name.startswith("03_"):
        # the curves, the filters, the test image, six feature-map figures, the confusion matrix, the misclassified
        assert len(pngs) >= 11, f"{path.name}: {len(pngs)} figures"
        source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        assert "split(0.1" in source and "val_data=test" not in source  # validation is a split of the training data
        printed = "".join(t for t in texts)
        assert "validation" in printed and "misclassified" in printed
