"""The README's two set-up commands are the ones CI and users actually run."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = _bash_blocks(readme)
    run_cmd, test_cmd = blocks[0], blocks[1]
    assert run_cmd == 'pip install -e . && jaxinfer generate "What is the capital of France?"'
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci, "the README's test command must be the last step of .ci/run"
    assert ci[-1] == test_cmd
    # the front-door stage runs the README's run command verbatim (output captured) before the tests
    runs = [i for i, line in enumerate(ci) if line.strip().startswith(run_cmd + " >")]
    assert len(runs) == 1, "the README's run command must be a stage of .ci/run"
    assert runs[0] < ci.index(test_cmd)
    stage = ci[runs[0]:ci.index(test_cmd)]
    assert any("find_spec('torch') is None" in line for line in stage), "stage 1 must check torch is absent"


def test_console_script_declared():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'jaxinfer = "jaxinfer.cli:main"' in pyproject


def test_ruff_clean():
    import shutil
    import subprocess

    ruff = shutil.which("ruff")
    assert ruff, "ruff is a test dependency"
    out = subprocess.run([ruff, "check", "."], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:]
