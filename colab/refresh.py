"""Re-run a notebook at full size and store its outputs in place, dated and with the machine named.

    python colab/refresh.py quickstart --machine "a 2-core AMD EPYC VM, CPU only"

Runs every cell in order in a fresh kernel (stopping at the first error, which leaves the file untouched), then
keeps the file small: no per-cell metadata (execution timestamps), consecutive stream outputs merged, progress
bar redraws ("\\r") reduced to their last state. The first markdown cell's "outputs below are from a run on
<machine>, <date>" line is updated.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

COLAB = Path(__file__).resolve().parent
RUN_LINE = re.compile(r"(outputs below are from a run on )(.*?), (\d{4}-\d{2}-\d{2})(\*\*)", re.S)


def strip(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drop noisy metadata and collapse the stream outputs of every code cell."""
    nb.metadata = {k: v for k, v in nb.metadata.items() if k in ("kernelspec", "colab")}
    nb.metadata["language_info"] = {"name": "python"}
    for cell in nb.cells:
        cell.metadata = {}
        if cell.cell_type != "code":
            continue
        merged = []
        for out in cell.outputs:
            if merged and out.output_type == "stream" == merged[-1].output_type and out.name == merged[-1].name:
                merged[-1].text += out.text
            else:
                merged.append(out)
        for out in merged:
            if out.output_type == "stream":
                out.text = "\n".join(line.rstrip("\r").split("\r")[-1] for line in out.text.split("\n"))
            elif "metadata" in out:
                out.metadata = {}
        cell.outputs = merged
    return nb


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notebook", help="name in colab/ (quickstart, quantize, tpu_vm)")
    ap.add_argument("--machine", required=True, help="the machine, as the first cell names it")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = ap.parse_args(argv)
    path = COLAB / f"{args.notebook}.ipynb"
    nb = nbformat.read(path, as_version=4)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXINFER_NOTEBOOK_SMALL")}
    env.setdefault("JAX_PLATFORMS", "cpu")
    NotebookClient(
        nb, timeout=args.timeout, kernel_name="python3", resources={"metadata": {"path": str(COLAB)}}
    ).execute(env=env)
    today = datetime.date.today().isoformat()
    first = nb.cells[0]
    if not RUN_LINE.search(first.source):
        sys.exit(f"{path.name}: the first cell has no 'outputs below are from a run on <machine>, <date>**' line")
    first.source = RUN_LINE.sub(lambda m: f"{m[1]}{args.machine}, {today}{m[4]}", first.source)
    nbformat.write(strip(nb), path)
    print(f"{path.name}: outputs of a run on {args.machine}, {today}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
