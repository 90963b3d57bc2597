"""Execute notebooks top to bottom in a fresh kernel with CI sizes, failing on the first cell error.

    python colab/execute.py quickstart [tpu_vm ...]

Used by `.ci/run` to walk through a notebook in the front-door environment (``pip install -e .`` plus what a
Colab runtime already has: nbclient / ipykernel / matplotlib, no torch, no test extras). The outputs are not
written back (colab/refresh.py records full-size runs).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

COLAB = Path(__file__).resolve().parent


def main() -> None:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAXINFER_NOTEBOOK_SMALL="1", JAX_PLATFORMS="cpu")
    for name in sys.argv[1:]:
        nb = nbformat.read(COLAB / f"{name}.ipynb", as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                cell.outputs = []
        start = time.perf_counter()
        NotebookClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(COLAB)}}).execute(
            env=env
        )
        print(f"{name}.ipynb: every cell ran ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
