"""Row operations of a transformer layer: RMSNorm, residual add + RMSNorm and SwiGLU (XLA path and a C++
CPU kernel)."""

from pallas_kernels.norm_act.api import add_rms_norm, rms_norm, swiglu

__all__ = ["add_rms_norm", "rms_norm", "swiglu"]
