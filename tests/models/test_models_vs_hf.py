"""Every supported architecture against HF transformers (PyTorch, float32) on tiny random models.

Tolerance: |logits - hf| <= 1e-4 * max|hf logits| (both float32; differences come from summation order).
"""

import pytest

from jaxinfer.loader import load_model
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.target import Kernels
from pallas_kernels import cpu_build
from pallas_kernels.norm_act import cpu as norm_act_cpu
from tests.models.hf_checks import check_incremental_decode_vs_full, check_ragged_prefill_vs_hf, hf_greedy
from tests.tiny_models import ARCHS


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch_model(request, tiny_model_dir):
    path, hf = tiny_model_dir(request.param)
    return request.param, load_model(str(path)), hf


def test_logits_match_hf_on_ragged_batch(arch_model):
    arch, m, hf = arch_model
    check_ragged_prefill_vs_hf(m, hf, arch)


@pytest.mark.skipif(cpu_build.compiler() is None, reason="no C++ compiler")
def test_logits_match_hf_with_the_cpu_row_kernels(arch_model):
    """The same with the layers' RMSNorm / residual add + RMSNorm / SwiGLU on the C++ row kernel (Qwen3: also
    its per-head q / k norms), as the engine runs them on a CPU."""
    assert norm_act_cpu.available(), norm_act_cpu.RMS_NORM.state
    arch, m, hf = arch_model
    check_ragged_prefill_vs_hf(m, hf, arch, kernels=Kernels("xla", "xla", norm="cpu"))


def test_incremental_decode_equals_full_forward(arch_model):
    arch, m, _ = arch_model
    check_incremental_decode_vs_full(m, arch)


def test_greedy_generation_equals_hf_generate(arch_model, tiny_model_dir):
    from jaxinfer import LLM

    arch, _, hf = arch_model
    path, _ = tiny_model_dir(arch)
    llm = LLM(str(path))
    prompts = [[1, 17, 42, 99, 7], [1, 250, 3, 8, 64, 120, 77, 5, 9]]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 32), arch
        assert out.outputs[0].finish_reason == "length"
