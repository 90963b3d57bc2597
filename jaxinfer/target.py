"""The kernels a model runs with, decided once from the devices it is placed on.

Library code below the runner never asks ``jax.default_backend()`` which kernel to use: the engine
resolves a :class:`Kernels` from its mesh (or the caller names the implementations), the runner carries it
and applies it when a step is traced (:meth:`jaxinfer.models.causal_lm.CausalLM.forward`).
"""

from __future__ import annotations

from dataclasses import dataclass

from jax.sharding import Mesh

from pallas_kernels.backend import ATTENTION_IMPLS, IMPLS, check_impl, default_impl
from pallas_kernels.logits_rows import cpu as logits_rows_cpu
from pallas_kernels.norm_act import cpu as norm_act_cpu

#: Sampler row-reduction implementations (:class:`Kernels`' ``sampler``).
SAMPLER_IMPLS = ("xla", "cpu")
#: Layer row-kernel implementations (:class:`Kernels`' ``norm``: RMSNorm, residual add + RMSNorm, SwiGLU).
NORM_IMPLS = ("xla", "cpu")


@dataclass(frozen=True)
class Kernels:
    """Kernel implementations of one model placement.

    Attributes:
      attention: ragged paged attention ("xla", "cpu", "pallas_tpu" or "pallas_gpu").
      matmul: quantized matmul ("xla", "cpu", "pallas_tpu" or "pallas_gpu"; the grouped expert matmul runs
        "xla" for "cpu").
      attention_interpret / matmul_interpret: run that Pallas kernel in interpret mode (it was named for a
        platform other than the one the model is placed on, e.g. a TPU kernel tested on the CPU).
      matmul_int8_activations: the C++ CPU quantized matmul runs its int8 dot path (activations quantized
        per 32-block, AVX512-VNNI; ``jaxinfer.config.resolve_int8_activations``); only with ``matmul="cpu"``.
      sampler: the sampler's row argmax and log-normaliser: ``"xla"`` (jnp) or ``"cpu"`` (the C++ row kernel,
        :mod:`pallas_kernels.logits_rows`).
      norm: the layers' RMSNorm, residual add + RMSNorm and SwiGLU: ``"xla"`` (jnp) or ``"cpu"`` (the C++ row
        kernel, :mod:`pallas_kernels.norm_act`; single-device placements only).
    """

    attention: str
    matmul: str
    attention_interpret: bool = False
    matmul_interpret: bool = False
    matmul_int8_activations: bool = False
    sampler: str = "xla"
    norm: str = "xla"

    def __post_init__(self):
        check_impl(self.attention, ATTENTION_IMPLS)
        check_impl(self.matmul, IMPLS)
        if self.matmul_int8_activations and self.matmul != "cpu":
            raise ValueError(f"int8 activations need the C++ CPU quantized matmul (matmul='cpu'), not {self.matmul!r}")
        check_impl(self.sampler, SAMPLER_IMPLS)
        check_impl(self.norm, NORM_IMPLS)

    @classmethod
    def for_mesh(cls, mesh: Mesh, attention: str | None = None, matmul: str | None = None) -> Kernels:
        """The defaults for ``mesh``'s device platform (``JAXINFER_KERNEL_IMPL`` still overrides them);
        ``attention`` / ``matmul`` name an implementation explicitly. A mesh of compile-only devices (a TPU
        or GPU topology, see :mod:`pallas_kernels.targets`) gives that platform's compiled kernels. The
        sampler runs the C++ row kernel on the CPU when attention does (same compiler, same fallback), and so
        do the layers' norms and SwiGLU on a single CPU device."""
        platform = mesh.devices.flat[0].platform
        attention = attention or default_impl(platform, attention=True)
        matmul = matmul or default_impl(platform)
        sampler = "cpu" if platform == "cpu" and attention == "cpu" and logits_rows_cpu.buildable() else "xla"
        single = platform == "cpu" and attention == "cpu" and mesh.devices.size == 1
        norm = "cpu" if single and norm_act_cpu.buildable() else "xla"
        return cls(attention, matmul, _interpreted(attention, platform), _interpreted(matmul, platform),
                   sampler=sampler, norm=norm)

    @property
    def compiled_for_tpu(self) -> bool:
        """Whether a kernel here is the compiled Pallas TPU one, i.e. the model is placed on TPUs (where
        arrays take the TPU compiler's tiled layouts)."""
        return (self.attention == "pallas_tpu" and not self.attention_interpret) or (
            self.matmul == "pallas_tpu" and not self.matmul_interpret)


_KERNEL_PLATFORMS = {"pallas_tpu": ("tpu",), "pallas_gpu": ("gpu", "cuda", "rocm")}


def _interpreted(impl: str, platform: str) -> bool:
    """Whether the Pallas kernel ``impl`` must be interpreted on devices of ``platform``."""
    return impl in _KERNEL_PLATFORMS and platform not in _KERNEL_PLATFORMS[impl]
