"""The floors between packages (README "Architecture"): imports point down, never up, and never in a circle.

    serve/, quantize/      stand on jaxinfer (serve: only on jaxinfer)
    jaxinfer/              stands on pallas_kernels; imports serve / quantize only in its CLI root
    pallas_kernels/        imports no project package (only jax, numpy and its own files)

Every import statement counts, including ones inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pallas_kernels", "jaxinfer", "quantize", "serve")
# package -> project packages it may import
ALLOWED = {
    "pallas_kernels": set(),
    "jaxinfer": {"pallas_kernels"},
    "quantize": {"jaxinfer", "pallas_kernels"},
    "serve": {"jaxinfer"},
}
COMPOSITION_ROOTS = {  # file -> extra packages it may import (it wires the front ends together)
    "jaxinfer/cli.py": {"serve", "quantize"},
}


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """``(line, top-level project package)`` for every absolute import in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        out += [(node.lineno, n.split(".")[0]) for n in names if n.split(".")[0] in PACKAGES]
    return out


def upward_imports(root: Path) -> list[str]:
    """Every import in ``root``'s packages that the floors forbid, as ``file:line: a imports b``."""
    bad = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            allowed = ALLOWED[package] | {package} | COMPOSITION_ROOTS.get(rel, set())
            bad += [f"{rel}:{line}: {package} imports {target}"
                    for line, target in imported_packages(path) if target not in allowed]
    return bad


def test_no_upward_imports():
    assert upward_imports(ROOT) == []


def test_the_check_catches_an_upward_import(tmp_path):
    """A deliberate upward import in a copy of the layout is reported (the check can fail)."""
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "pallas_kernels" / "kernel.py").write_text("import jax\n\ndef f():\n    from jaxinfer import x\n")
    (tmp_path / "jaxinfer" / "engine.py").write_text("from serve.http_server import app\n")
    (tmp_path / "jaxinfer" / "cli.py").write_text("from serve.cli import register\n")  # allowed: the root
    (tmp_path / "serve" / "grpc.py").write_text("import quantize.rtn\n")
    assert upward_imports(tmp_path) == [
        "pallas_kernels/kernel.py:4: pallas_kernels imports jaxinfer",
        "jaxinfer/engine.py:1: jaxinfer imports serve",
        "serve/grpc.py:1: serve imports quantize",
    ]
