"""Every Pallas kernel compiled (interpret off) for TPU v5e / v5p / v6e and an H100, on this CPU-only machine.

Compile-only: the real compilers (XLA TPU + Mosaic from libtpu; XLA GPU + Triton + ptxas from the CUDA
plugin) run against compile-only devices of :mod:`pallas_kernels.targets`; nothing executes, so this
checks that the kernels are accepted by the compilers at the engine's shapes, not that they are correct
or fast on the hardware (the interpret-mode tests check the numbers).

Needs ``pip install -e ".[aot]"`` (the README's test command installs it); without the toolchain the tests
fail rather than skip.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest

from pallas_kernels.quantized_matmul.tuning import Blocks
from pallas_kernels.targets import TARGETS, ToolchainUnavailableError, target_devices
from tests.kernels import aot_cases
from tests.kernels.aot_cases import QMM_FORMATS, AttnCase

pytestmark = pytest.mark.aot

TPU_TARGETS = ("tpu-v5e", "tpu-v6e", "tpu-v5p")
ALL_TARGETS = (*TPU_TARGETS, "h100")


@pytest.fixture(autouse=True, scope="module")
def _no_persistent_cache():
    """Compile-only executables cannot be read back from the persistent compilation cache (it needs a
    client to deserialize them): turn it off here instead of filling it with unreadable entries."""
    import jax

    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", before)


def _require(target: str) -> None:
    try:
        target_devices(target)
    except ToolchainUnavailableError as e:  # the README's test command installs the aot extra: never skip
        pytest.fail(f"{target} cannot be compiled for: {e}")


# Every page dtype and bucket (f32 pages only at decode and prefill, fp8 at decode and mixed), then
# head shapes, sliding window and soft cap. head_dim 64 uses the TPU's default fused K|V pages
# (test_attention_compiles_head_major_d64 the 128-lane padded ones).
ATTN_CASES = [
    *(AttnCase(bucket=b, kv=kv) for kv in ("bf16", "int8") for b in aot_cases.BUCKETS),
    AttnCase(bucket="decode", kv="f32"),
    AttnCase(bucket="prefill", kv="f32"),
    AttnCase(bucket="decode", kv="fp8"),
    AttnCase(bucket="mixed", kv="fp8"),
    AttnCase(heads="gqa4-d128"),
    AttnCase(heads="gqa1-d128", bucket="prefill"),
    AttnCase(heads="gqa4-d128", kv="fp8", bucket="prefill"),
    AttnCase(heads="gqa1-d64", kv="int8", bucket="mixed"),
    AttnCase(bucket="mixed", sliding_window=256, soft_cap=30.0),
    AttnCase(heads="gqa4-d128", kv="int8", sliding_window=128, soft_cap=50.0),
]


@pytest.mark.parametrize("target", ALL_TARGETS)
@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: c.id)
def test_attention_compiles(target, case):
    _require(target)
    compiled = aot_cases.attention_lowered(target, case).compile()
    text = compiled.as_text()
    # The Pallas kernel is in the compiled program (a Mosaic custom call / a Triton fusion), not an
    # XLA fallback.
    assert "ragged_paged_attention" in text


@pytest.mark.parametrize("target", TPU_TARGETS)
def test_attention_compiles_head_major_d64(target):
    """head_dim 64 in 128-lane padded head-major pages (a cache made with layout='head_major')."""
    _require(target)
    case = AttnCase(bucket="mixed", kv="int8", layout="head_major")
    assert "ragged_paged_attention" in aot_cases.attention_lowered(target, case).compile().as_text()


# Every format at batch 1 and 64 on SmolLM2's down_proj (K=1536: a masked K tail for int4 g128 on the
# TPU); K=576 (SmolLM2's gate/up: a K tail on the GPU, bk=128) for formats whose groups divide it; two
# Llama-3-8B-shaped matmuls at batch 64.
QMM_CASES = [(fmt, m, "k1536") for fmt in QMM_FORMATS for m in (1, 64)]
QMM_CASES += [(fmt, 64, "k576") for fmt in ("int8", "int4-g32", "int4-g64", "fp8-w8a8", "int8-w8a8")]
QMM_CASES += [("int8", 64, "k14336"), ("int4", 64, "k4096")]


@pytest.mark.parametrize("target", ALL_TARGETS)
@pytest.mark.parametrize("case", QMM_CASES, ids=lambda c: "-".join(map(str, c)))
def test_quantized_matmul_compiles(target, case):
    _require(target)
    compiled = aot_cases.matmul_lowered(target, *case).compile()
    assert "qmm_" in compiled.as_text()


# Grouped (MoE) matmul at Qwen3-30B-A3B expert shapes: bf16, int8 and int4 experts; decode rows on the fused
# gate/up projection and prefill rows on down_proj.
GMM_CASES = [(fmt, rows, shape) for fmt in (None, "int8", "int4") for rows, shape in (("decode", "gate_up"),
                                                                                   ("prefill", "down"))]


@pytest.mark.parametrize("target", ALL_TARGETS)
@pytest.mark.parametrize("case", GMM_CASES, ids=lambda c: "-".join(map(str, (c[0] or "bf16", *c[1:]))))
def test_grouped_matmul_compiles(target, case):
    _require(target)
    compiled = aot_cases.grouped_lowered(target, *case).compile()
    assert "gmm_" in compiled.as_text()


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_cases_cover_k_tails(target):
    """The matmul cases include K with and without a masked tail on every target."""
    tails = {aot_cases.k_has_tail(target, *case) for case in QMM_CASES}
    assert tails == {True, False}


def test_tpu_vmem_overflow_is_refused():
    """Negative control: an oversized tile is rejected by the TPU compiler, not silently accepted."""
    _require("tpu-v5e")
    # x (256, 4096) bf16 + w (4096, 4096) int8, double-buffered, and its bf16 copy: ~88 MB of VMEM against a
    # 16 MiB scoped limit. (Much larger tiles take Mosaic minutes to refuse.)
    low = aot_cases.matmul_lowered("tpu-v5e", "int8", 256, (4096, 4096), blocks=Blocks(256, 4096, 4096))
    with pytest.raises(Exception, match="vmem"):
        low.compile()


def test_gpu_shared_memory_overflow_is_refused():
    """Negative control: a tile needing more than the H100's 227 KiB of shared memory fails to compile."""
    _require("h100")
    low = aot_cases.matmul_lowered("h100", "int8", 64, "k14336", blocks=Blocks(64, 512, 1024))
    with pytest.raises(Exception, match="Shared memory size limit exceeded"):
        low.compile()


def _ptxas() -> str:
    spec = importlib.util.find_spec("nvidia.cuda_nvcc")
    assert spec is not None and spec.submodule_search_locations, "nvidia-cuda-nvcc-cu12 is not installed"
    return str(Path(list(spec.submodule_search_locations)[0]) / "bin" / "ptxas")


def _ptxas_report(lowered, marker: str) -> tuple[str, str]:
    """``(ptxas -v report, PTX)`` of the kernel named ``marker`` in an H100 compile of ``lowered``.

    Reads the PTX from an XLA dump of the compile and runs ptxas on it (as XLA does) with ``-v``.
    """
    with tempfile.TemporaryDirectory() as dump:
        lowered.compile(compiler_options={"xla_dump_to": dump})
        ptx = [p for p in glob.glob(f"{dump}/**/*.ptx", recursive=True) if marker in Path(p).read_text()]
        assert len(ptx) == 1, ptx
        text = Path(ptx[0]).read_text()
        res = subprocess.run([_ptxas(), "-arch=sm_90a", "-v", "--warn-on-spills", ptx[0], "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    return res.stderr, text


def _assert_no_spills(report: str) -> None:
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", report)]
    assert regs and max(regs) < 255, report
    assert "spill" in report and not re.search(r"[1-9]\d* bytes spill (stores|loads)", report), report


@pytest.mark.parametrize("fmt", ["int4", "int4-g32", "int4-g64", "int4-asym", "fp8-w8a8", "int8-g32"])
def test_gpu_matmul_batch64_no_spills_and_wgmma(fmt):
    """At batch 64 on the H100 the default tiling neither spills registers nor falls back to mma.sync."""
    _require("h100")
    report, text = _ptxas_report(aot_cases.matmul_lowered("h100", fmt, 64, "k4096"), "qmm_")
    _assert_no_spills(report)
    assert re.search(r"\bwgmma\.mma_async", text), "no wgmma in the PTX"
    assert not re.search(r"\bmma\.sync", text), "mma.sync in the PTX"


@pytest.mark.parametrize("case", GMM_CASES, ids=lambda c: "-".join(map(str, (c[0] or "bf16", *c[1:]))))
def test_gpu_grouped_matmul_no_spills(case):
    """The grouped matmul's default H100 tiles do not spill; prefill tiles (64 rows) use wgmma."""
    _require("h100")
    report, text = _ptxas_report(aot_cases.grouped_lowered("h100", *case), "gmm_")
    _assert_no_spills(report)
    if case[1] == "prefill":
        assert re.search(r"\bwgmma\.mma_async", text) and not re.search(r"\bmma\.sync", text)


def test_targets_table():
    """Target names, platforms and hardware figures are consistent (and the devices are what they say)."""
    assert set(TARGETS) >= {"tpu-v5e", "tpu-v6e", "tpu-v5p", "h100"}
    for tgt in TARGETS.values():
        assert tgt.hbm_bytes > 8 * 2**30 and tgt.hbm_bandwidth > 5e11
        assert tgt.peak_int8_ops >= tgt.peak_bf16_flops > 1e14
    with pytest.raises(ValueError, match="unknown compile target"):
        target_devices("tpu-v99")


@pytest.mark.parametrize("target,n", [("tpu-v5e", 1), ("tpu-v5e", 8), ("tpu-v6e", 4), ("tpu-v5p", 8), ("h100", 1)])
def test_target_devices(target, n):
    _require(target)
    devices = target_devices(target, n)
    assert len(devices) == n and len(set(devices)) == n
    assert all(d.device_kind == TARGETS[target].device_kind for d in devices)


@pytest.mark.parametrize("split,fmt", [("n", "int4"), ("k", "int8"), ("n", "int8-w8a8")])
def test_sharded_quantized_matmul_compiles_on_v5e_4(split, fmt):
    """The shard_map'd quantized matmul compiles for a 4-chip v5e (Llama-3-8B down/up-shaped weights)."""
    _require("tpu-v5e")
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from pallas_kernels.quantized_matmul.qarray import abstract_qarray
    from pallas_kernels.quantized_matmul.sharded import quantized_matmul_sharded, weight_specs
    from pallas_kernels.targets import target_mesh

    mesh = target_mesh("tpu-v5e", (4,), ("model",))
    k, n = (4096, 14336) if split == "n" else (14336, 4096)
    w = abstract_qarray(k, n, fmt)
    w = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, s)),
                     w, weight_specs(w, split, "model"))
    x = jax.ShapeDtypeStruct((64, k), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "model") if split == "k"
                                                                             else P()))
    fn = jax.jit(lambda a, b: quantized_matmul_sharded(a, b, mesh, split=split, impl="pallas_tpu", interpret=False))
    compiled = fn.lower(x, w).compile()
    text = compiled.as_text()
    assert "qmm_" in text and (split == "n" or "all-reduce" in text)


def test_aot_extra_is_separate():
    """The aot extra holds the toolchain; the plain install pulls none of it."""
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"])
    for name in ("libtpu", "tpu", "cuda", "nvidia"):
        assert name not in base
    aot = " ".join(project["optional-dependencies"]["aot"])
    for name in ("jax[tpu", "jax-cuda12-plugin", "jax-cuda12-pjrt", "nvidia-cuda-nvcc-cu12", "nvidia-cuda-runtime-cu12",
                 "absl-py"):
        assert name in aot
