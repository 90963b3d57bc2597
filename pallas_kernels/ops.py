"""Public kernel ops. Each picks its implementation by ``impl`` (see :mod:`pallas_kernels.backend`)."""

from pallas_kernels.backend import default_impl
from pallas_kernels.quantized_matmul.api import quantized_matmul
from pallas_kernels.ragged_paged_attention.api import KVPages, ragged_paged_attention, write_kv

__all__ = ["KVPages", "default_impl", "quantized_matmul", "ragged_paged_attention", "write_kv"]
