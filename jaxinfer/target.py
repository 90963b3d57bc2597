"""The kernels a model runs with, decided once from the devices it is placed on.

Library code below the runner never asks ``jax.default_backend()`` which kernel to use: the engine
resolves a :class:`Kernels` from its mesh (or the caller names the implementations), the runner carries it
and applies it when a step is traced (:meth:`jaxinfer.models.causal_lm.CausalLM.forward`).
"""

from __future__ import annotations

from dataclasses import dataclass

from jax.sharding import Mesh

from pallas_kernels.backend import ATTENTION_IMPLS, IMPLS, check_impl, default_impl


@dataclass(frozen=True)
class Kernels:
    """Kernel implementations of one model placement.

    Attributes:
      attention: ragged paged attention ("xla", "cpu", "pallas_tpu" or "pallas_gpu").
      matmul: quantized matmul ("xla", "pallas_tpu" or "pallas_gpu").
    """

    attention: str
    matmul: str

    def __post_init__(self):
        check_impl(self.attention, ATTENTION_IMPLS)
        check_impl(self.matmul, IMPLS)

    @classmethod
    def for_mesh(cls, mesh: Mesh, attention: str | None = None, matmul: str | None = None) -> Kernels:
        """The defaults for ``mesh``'s device platform (``JAXINFER_KERNEL_IMPL`` still overrides them);
        ``attention`` / ``matmul`` name an implementation explicitly."""
        platform = mesh.devices.flat[0].platform
        return cls(attention=attention or default_impl(platform, attention=True),
                   matmul=matmul or default_impl(platform))
