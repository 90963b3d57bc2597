"""pallas_kernels.cpu_build: the shared headers are on the include path and in the cache key."""

import ctypes
import platform
import shutil
import subprocess

import pytest

from pallas_kernels import cpu_build

pytestmark = pytest.mark.skipif(cpu_build.compiler() is None, reason="no C++ compiler")

SOURCE = '#include "probe_shared.h"\nextern "C" int probe() { return kProbe; }\n'


def _build_and_call(source):
    path = cpu_build.build(source, "probe", cpu_build.compiler())
    return path, ctypes.CDLL(str(path)).probe()


def test_a_header_edit_rebuilds(tmp_path, monkeypatch):
    headers = tmp_path / "include"
    headers.mkdir()
    monkeypatch.setattr(cpu_build, "HEADER_DIR", headers)
    monkeypatch.setenv("JAXINFER_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "probe.cc"
    source.write_text(SOURCE)
    (headers / "probe_shared.h").write_text("constexpr int kProbe = 7;\n")
    first, value = _build_and_call(source)
    assert value == 7 and first.parent == tmp_path / "cache" / "cpu_kernels"
    assert cpu_build.build(source, "probe", cpu_build.compiler()) == first  # unchanged: the cached file
    (headers / "probe_shared.h").write_text("constexpr int kProbe = 11;\n")
    second, value = _build_and_call(source)
    assert second != first and value == 11


def test_an_edit_of_a_header_next_to_the_source_rebuilds(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_build, "HEADER_DIR", tmp_path / "none")
    monkeypatch.setenv("JAXINFER_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "probe.cc"
    source.write_text(SOURCE)
    (tmp_path / "probe_shared.h").write_text("constexpr int kProbe = 3;\n")
    first, value = _build_and_call(source)
    assert value == 3
    (tmp_path / "probe_shared.h").write_text("constexpr int kProbe = 5;\n")
    second, value = _build_and_call(source)
    assert second != first and value == 5


def test_every_kernel_source_is_package_data():
    """A wheel must carry every C++ source and header the CPU kernels compile from on first use."""
    import fnmatch
    import tomllib
    from pathlib import Path

    root = Path(cpu_build.__file__).resolve().parent
    project = tomllib.loads((root.parent / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["package-data"]["pallas_kernels"]
    sources = [p.relative_to(root).as_posix() for ext in ("*.cc", "*.h") for p in root.rglob(ext)]
    assert len(sources) >= 6
    missing = [s for s in sources if not any(fnmatch.fnmatch(s, pat) and s.count("/") == pat.count("/")
                                             for pat in patterns)]
    assert not missing, f"not in [tool.setuptools.package-data] pallas_kernels: {missing}"


@pytest.mark.skipif(platform.machine() != "x86_64", reason="looks for the x86-64 prefetcht0 instruction")
def test_the_decode_attention_prefetches_reach_the_machine_code():
    """GCC at -O2 and up deleted the decode attention's look-ahead loop (its body was only
    __builtin_prefetch, which -ffinite-loops lets it drop): the shared Prefetch helper must survive."""
    from pallas_kernels.ragged_paged_attention import cpu

    assert shutil.which("objdump"), "objdump (binutils, which the C++ compiler needs too) is not on the path"
    lib = cpu_build.build(cpu.KERNEL.source, cpu.KERNEL.prefix, cpu_build.compiler())
    dump = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", str(lib)], capture_output=True, text=True,
                          check=True).stdout
    name = "RunDecodeItem<(jaxinfer_rpa_cpu::KvType)0, 4, 3, false>"  # float32 pages, head_dim 64, 3 queries
    headers = [(b.split("\n", 1)[0], b) for b in dump.split("\n\n")]
    bodies = [b for head, b in headers if name in head and "@plt" not in head]
    assert len(bodies) == 1
    assert bodies[0].count("prefetcht0") >= 2, "the K / V look-ahead prefetches were compiled away"
