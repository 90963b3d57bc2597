"""Quantization formats: one frozen, hashable description shared by converters, QArray and kernels.

A format is a weight storage type, a scale granularity and an optional activation quantization:

===============  ========  ============  =========  ==========================================
preset           weight    group_size    symmetric  act
===============  ========  ============  =========  ==========================================
``int8``         int8      None (per N)  yes        None   (W8A16)
``int8-g32``     int8      32            yes        None   (W8A16, GGUF Q8_0 layout)
``int4``         int4      128           yes        None   (W4A16)
``int4-asym``    int4      128           no         None   (W4A16 with a per-group min)
``fp8``          fp8       None          yes        None   (W8A16, float8_e4m3fn weights)
``fp8-w8a8``     fp8       None          yes        fp8    (dynamic per-token activation scales)
``int8-w8a8``    int8      None          yes        int8   (SmoothQuant-style, dynamic per token)
===============  ========  ============  =========  ==========================================

Dequantization, for a weight ``w[K, N]`` with ``g`` rows per group (``g = K`` when per channel):

* symmetric:  ``w[k, n] = scale[k // g, n] * q[k, n]``
* asymmetric: ``w[k, n] = scale[k // g, n] * q[k, n] + offset[k // g, n]`` with ``q`` in ``[0, 2**bits)``
  (an integer zero point ``z`` is the special case ``offset = -scale * z``).
"""

from __future__ import annotations

import dataclasses

WEIGHT_TYPES = ("int8", "int4", "fp8")
ACT_TYPES = (None, "int8", "fp8")
GROUP_SIZES = (32, 64, 128)
SCALE_DTYPES = ("float32", "float16", "bfloat16")

FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How one linear weight is quantized.

    Attributes:
      weight: storage type of the weight values: ``"int8"``, ``"int4"`` (two per byte) or ``"fp8"``
        (float8_e4m3fn).
      group_size: rows of K sharing one scale (32, 64 or 128), or ``None`` for one scale per output
        channel. ``int4`` requires a group size; ``fp8`` and W8A8 formats require ``None``.
      symmetric: ``False`` adds a float offset (the group minimum) per group; ``int4`` only.
      act: ``None`` (weight-only, activations stay float) or ``"int8"`` / ``"fp8"``: activations are
        quantized per token (row of ``x``) at run time and the matmul runs in that type.
      scale_dtype: storage dtype of scales and offsets.
    """

    weight: str = "int8"
    group_size: int | None = None
    symmetric: bool = True
    act: str | None = None
    scale_dtype: str = "float32"

    def __post_init__(self):
        if self.weight not in WEIGHT_TYPES:
            raise ValueError(f"unsupported weight type {self.weight!r}; expected one of {WEIGHT_TYPES}")
        if self.act not in ACT_TYPES:
            raise ValueError(f"unsupported activation type {self.act!r}; expected one of {ACT_TYPES}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"unsupported scale dtype {self.scale_dtype!r}; expected one of {SCALE_DTYPES}")
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise ValueError(
                f"unsupported group size {self.group_size!r}; expected None or one of {GROUP_SIZES}"
            )
        if self.weight == "int4" and self.group_size is None:
            raise ValueError("int4 weights need a group size (32, 64 or 128)")
        if self.weight == "fp8" and self.group_size is not None:
            raise ValueError("fp8 weights use one scale per output channel (group_size=None)")
        if not self.symmetric and self.weight != "int4":
            raise ValueError("asymmetric quantization is supported for int4 weights only")
        if self.act == "int8" and self.weight != "int8":
            raise ValueError("act='int8' (W8A8) needs int8 weights")
        if self.act == "fp8" and self.weight != "fp8":
            raise ValueError("act='fp8' (W8A8) needs fp8 weights")
        if self.act is not None and self.group_size is not None:
            raise ValueError("W8A8 formats use one weight scale per output channel (group_size=None)")

    @property
    def bits(self) -> int:
        """Bits per stored weight value."""
        return 4 if self.weight == "int4" else 8

    @property
    def qmax(self) -> int:
        """Largest integer level of a symmetric integer format (127 or 7)."""
        return 2 ** (self.bits - 1) - 1

    @property
    def name(self) -> str:
        """Short readable name, e.g. ``int4-g128-asym`` or ``int8-w8a8``."""
        parts = [self.weight]
        if self.group_size is not None:
            parts.append(f"g{self.group_size}")
        if not self.symmetric:
            parts.append("asym")
        if self.act is not None:
            parts.append("w8a8")
        return "-".join(parts)

    def validate_shape(self, k: int, n: int) -> None:
        """Raise ``ValueError`` unless a ``[K, N]`` weight can be stored in this format."""
        if k <= 0 or n <= 0:
            raise ValueError(f"weight shape must be positive, got {(k, n)}")
        if self.group_size is not None and k % self.group_size:
            raise ValueError(f"K={k} is not divisible by group_size={self.group_size}")


PRESETS: dict[str, QuantConfig] = {
    "int8": QuantConfig("int8"),
    "int8-g32": QuantConfig("int8", group_size=32),
    "int4": QuantConfig("int4", group_size=128),
    "int4-g32": QuantConfig("int4", group_size=32),
    "int4-g64": QuantConfig("int4", group_size=64),
    "int4-asym": QuantConfig("int4", group_size=128, symmetric=False),
    "fp8": QuantConfig("fp8"),
    "fp8-w8a8": QuantConfig("fp8", act="fp8"),
    "int8-w8a8": QuantConfig("int8", act="int8"),
}


def as_config(cfg: QuantConfig | str) -> QuantConfig:
    """A :class:`QuantConfig` from itself or a preset name (see :data:`PRESETS`)."""
    if isinstance(cfg, QuantConfig):
        return cfg
    if isinstance(cfg, str):
        if cfg not in PRESETS:
            raise ValueError(f"unknown quantization preset {cfg!r}; expected one of {sorted(PRESETS)}")
        return PRESETS[cfg]
    raise TypeError(f"expected a QuantConfig or a preset name, got {type(cfg).__name__}")
