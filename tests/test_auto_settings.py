"""What ``dtype="auto"`` means on this machine (jaxinfer.config.resolve_auto_settings)."""

import jax.numpy as jnp
import pytest

from jaxinfer.config import (
    AUTO_DTYPE_ENV,
    EngineConfig,
    cpu_has_bf16_matmul,
    resolve_auto_settings,
    resolve_int8_activations,
)
from pallas_kernels.quantized_matmul import cpu as qmm_cpu
from pallas_kernels.quantized_matmul.qarray import QArray

ZEN4 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 amx_tile amx_int8\n"
SKYLAKE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n"


def test_cpu_flags():
    assert cpu_has_bf16_matmul(ZEN4) and cpu_has_bf16_matmul(SAPPHIRE)
    assert not cpu_has_bf16_matmul(SKYLAKE)
    assert not cpu_has_bf16_matmul("no flags line here")


def test_auto_on_cpus(monkeypatch):
    monkeypatch.delenv(AUTO_DTYPE_ENV, raising=False)
    fast = resolve_auto_settings(EngineConfig(), "cpu", bf16_cpu=True)
    assert (fast.dtype, fast.kv_cache_dtype) == ("bfloat16", "int8")
    plain = resolve_auto_settings(EngineConfig(), "cpu", bf16_cpu=False)
    assert (plain.dtype, plain.kv_cache_dtype) == ("float32", "auto")
    # an explicit KV dtype is kept; an explicit dtype leaves everything as given
    assert resolve_auto_settings(EngineConfig(kv_cache_dtype="fp8"), "cpu", bf16_cpu=True).kv_cache_dtype == "fp8"
    explicit = EngineConfig(dtype="float32")
    assert resolve_auto_settings(explicit, "cpu", bf16_cpu=True) is explicit
    gpu = resolve_auto_settings(EngineConfig(), "gpu")
    assert (gpu.dtype, gpu.kv_cache_dtype) == ("bfloat16", "auto")


def test_gguf_weights_stay_quantized_on_the_cpu_with_the_kernel(monkeypatch):
    monkeypatch.delenv(AUTO_DTYPE_ENV, raising=False)
    kw = dict(bf16_cpu=True, gguf_model=True)
    assert resolve_auto_settings(EngineConfig(), "cpu", cpu_matmul_kernel=True, **kw).quantization == "gguf"
    assert resolve_auto_settings(EngineConfig(), "cpu", cpu_matmul_kernel=False, **kw).quantization is None
    assert resolve_auto_settings(EngineConfig(), "cpu", bf16_cpu=True, cpu_matmul_kernel=True).quantization is None
    assert resolve_auto_settings(EngineConfig(tensor_parallel_size=2), "cpu", cpu_matmul_kernel=True,
                                 **kw).quantization is None
    assert resolve_auto_settings(EngineConfig(), "gpu", cpu_matmul_kernel=True, **kw).quantization is None
    explicit = EngineConfig(dtype="bfloat16")
    assert resolve_auto_settings(explicit, "cpu", cpu_matmul_kernel=True, **kw) is explicit
    monkeypatch.setenv(AUTO_DTYPE_ENV, "bfloat16")  # a forced dtype keeps the weights as loaded
    assert resolve_auto_settings(EngineConfig(), "cpu", cpu_matmul_kernel=True, **kw).quantization is None


def test_int8_activations_setting():
    """int8 activations: "auto" is on for bfloat16 compute on the C++ matmul kernel with AVX512-VNNI only."""
    bf16, f32 = jnp.bfloat16, jnp.float32
    assert resolve_int8_activations("auto", "cpu", bf16, vnni=True)
    assert not resolve_int8_activations("auto", "cpu", bf16, vnni=False)
    assert not resolve_int8_activations("auto", "cpu", f32, vnni=True)
    assert not resolve_int8_activations("auto", "xla", bf16, vnni=True)
    assert not resolve_int8_activations("off", "cpu", bf16, vnni=True)
    assert resolve_int8_activations("on", "cpu", f32, vnni=True)
    with pytest.raises(ValueError, match="needs the C\\+\\+ CPU quantized matmul"):
        resolve_int8_activations("on", "xla", bf16)
    with pytest.raises(ValueError, match="int8_activations"):
        resolve_int8_activations("yes", "cpu", bf16)
    with pytest.raises(ValueError, match="int8_activations"):
        EngineConfig(int8_activations="yes")


def test_env_override(monkeypatch):
    monkeypatch.setenv(AUTO_DTYPE_ENV, "float32")
    assert resolve_auto_settings(EngineConfig(), "cpu", bf16_cpu=True).dtype == "float32"
    monkeypatch.setenv(AUTO_DTYPE_ENV, "bfloat16")
    cfg = resolve_auto_settings(EngineConfig(), "cpu", bf16_cpu=False)
    assert (cfg.dtype, cfg.kv_cache_dtype) == ("bfloat16", "int8")
    monkeypatch.setenv(AUTO_DTYPE_ENV, "int4")
    with pytest.raises(ValueError, match=AUTO_DTYPE_ENV):
        resolve_auto_settings(EngineConfig(), "cpu")


def test_llm_default_follows_this_cpu(monkeypatch):
    """``LLM()`` with no dtype builds this CPU's choice: bf16 weights and int8 pages where the CPU has bf16
    instructions, float32 otherwise, the GGUF's own quantized weights with the C++ matmul kernel; and it
    generates."""
    from jaxinfer import LLM, SamplingParams

    monkeypatch.delenv(AUTO_DTYPE_ENV, raising=False)
    llm = LLM(max_model_len=128, max_num_seqs=2, max_num_batched_tokens=64, kv_cache_memory="16MiB")
    want_bf16 = cpu_has_bf16_matmul()
    assert llm.engine.loaded.model.dtype == (jnp.bfloat16 if want_bf16 else jnp.float32)
    assert llm.engine.kv_spec.quant_dtype == (jnp.int8 if want_bf16 else None)
    # the default model is a Q4_1 GGUF: its weights stay quantized for the C++ matmul kernel when it can be built
    up = llm.engine.runner.params["layers_0"]["mlp"]["up_proj"]["kernel"]
    if qmm_cpu.buildable():
        assert isinstance(up, QArray) and up.config.name == "int4-g32-asym"
        assert up.dtype == llm.engine.loaded.model.dtype
    else:
        assert up.dtype == llm.engine.loaded.model.dtype
    # int8 activations are opt-in ("off" by default): the weight-only numerics
    assert not llm.engine.kernels.matmul_int8_activations
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    a = llm.generate("The capital of France is", sp)[0].outputs[0]
    assert len(a.token_ids) == 8 and a.text.strip()
