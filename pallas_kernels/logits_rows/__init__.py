"""Row reductions of logits for the sampler: argmax and log-sum-exp (XLA path and a C++ CPU kernel)."""

from pallas_kernels.logits_rows.api import row_argmax, row_logsumexp

__all__ = ["row_argmax", "row_logsumexp"]
