"""Resumable state of a long ``bench/quant_quality.py`` run (the full WikiText-2 text takes hours on a CPU).

A work directory holds everything a run needs to continue where an interrupted one stopped::

    <work>/setup.json           what the run evaluates (text hash, windows, calibration, variants)
    <work>/calib.npy            the calibration tokens (i32[N, L]), fixed at the first start
    <work>/variants/<name>/     each quantized model, saved once (jaxinfer.quantized_checkpoint)
    <work>/progress-<part>.json running sums of each part, rewritten atomically every minute

A later start with the same setup loads the calibration, the quantized models and the sums, and scores
only the windows that are left; a start with a different setup refuses the directory (pass another one
or ``--restart``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class WorkDir:
    """One run's work directory (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, setup: dict, *, restart: bool = False):
        self.path = Path(path)
        if restart and self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        f = self.path / "setup.json"
        if f.exists():
            saved = json.loads(f.read_text())
            if saved != setup:
                diff = sorted(k for k in set(saved) | set(setup) if saved.get(k) != setup.get(k))
                raise SystemExit(f"{self.path} holds a run with a different setup ({', '.join(diff)} differ); "
                                 "pass --restart to start it over or --work-dir for another directory")
        else:
            self._write(f, setup)
        self.setup = setup

    @staticmethod
    def _write(path: Path, data: dict) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)  # atomic: an interrupted write never leaves a truncated file

    def calibration(self, make) -> tuple[np.ndarray, dict]:
        """The saved calibration tokens and their description, or ``make()``'s (saved for next time)."""
        f, d = self.path / "calib.npy", self.path / "calib.json"
        if f.exists() and d.exists():
            return np.load(f), json.loads(d.read_text())
        tokens, desc = make()
        np.save(f, np.asarray(tokens, np.int32))
        self._write(d, desc)
        return np.asarray(tokens, np.int32), desc

    def variant_dir(self, name: str) -> Path:
        return self.path / "variants" / name

    def progress(self, part: str) -> dict | None:
        f = self.path / f"progress-{part}.json"
        return json.loads(f.read_text()) if f.exists() else None

    def save_progress(self, part: str, data: dict) -> None:
        self._write(self.path / f"progress-{part}.json", data)
