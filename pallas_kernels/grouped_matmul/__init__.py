"""Grouped (ragged) matmul for mixture-of-experts layers: rows sorted by expert, one matmul per group."""

from pallas_kernels.grouped_matmul.api import grouped_matmul

__all__ = ["grouped_matmul"]
