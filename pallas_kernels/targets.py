"""Compile targets: TPU and NVIDIA GPU devices to compile for on a machine that has neither.

A :class:`Target` names a chip (``tpu-v5e``, ``tpu-v6e``, ``tpu-v5p``, ``h100``), the kernel
implementation that runs on it, and the public hardware figures a roofline needs. :func:`target_devices`
returns *compile-only* devices of that chip (from ``jax.experimental.topologies``): put
``jax.ShapeDtypeStruct(..., sharding=NamedSharding(Mesh(devices, ...), spec))`` arguments on them and
``jax.jit(f).lower(*args).compile()`` runs the real compiler (XLA TPU + Mosaic, or XLA GPU + Triton +
ptxas) without executing anything. Compiled is not run: numerics and speed still need the hardware.

Toolchain (``pip install -e ".[aot]"``): libtpu for TPU targets; jax-cuda12-plugin / -pjrt and
nvidia-cuda-nvcc-cu12 (ptxas) for GPU targets, of the installed jax's version. Without them
:func:`target_devices` raises :class:`ToolchainUnavailableError`. On a machine without CUDA libraries
the CUDA plugin only offers its deviceless topology when JAX's CUDA backend is not initialised, i.e.
with ``JAX_PLATFORMS=cpu`` set before jax is imported (the test suite's conftest does that).

The GPU target config (XLA's ``GpuTargetConfigProto`` for an H100 SXM) is the data file
``targets_data/h100_sxm.txtpb``; its header records its origin.

This module sits on the kernels floor: it imports only jax and the standard library.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from importlib import resources

import jax
import numpy as np

TPU = "tpu"
CUDA = "cuda"


class ToolchainUnavailableError(RuntimeError):
    """The compiler toolchain a target needs is not installed or cannot be initialised here."""


@dataclasses.dataclass(frozen=True)
class Target:
    """One accelerator chip to compile for.

    Attributes:
      name: the target's name (a key of :data:`TARGETS`).
      platform: ``"tpu"`` or ``"cuda"``.
      impl: the kernel implementation for it (``"pallas_tpu"`` / ``"pallas_gpu"``).
      device_kind: ``Device.device_kind`` of its compile-only devices (checked by :func:`target_devices`).
      hbm_bytes: HBM per chip in bytes.
      hbm_bandwidth: HBM bandwidth per chip in bytes / s.
      peak_bf16_flops: dense bf16 matmul peak per chip, flop / s.
      peak_int8_ops: dense int8 matmul peak per chip, op / s.
      peak_fp8_flops: dense fp8 matmul peak per chip, flop / s (``None``: no fp8 matrix unit).
      topologies: chips -> topology name (TPU: ``"v5e:2x4"``; CUDA: ``"1x1x8"``); one chip is the
        first device of the smallest topology (libtpu refuses ``1x1``).
      target_config: package data file holding the GPU target config (CUDA only).
    """

    name: str
    platform: str
    impl: str
    device_kind: str
    hbm_bytes: int
    hbm_bandwidth: float
    peak_bf16_flops: float
    peak_int8_ops: float
    peak_fp8_flops: float | None
    topologies: tuple[tuple[int, str], ...]
    target_config: str | None = None

    def topology_for(self, num_devices: int) -> str:
        """The topology name with at least ``num_devices`` chips (smallest such)."""
        for chips, topo in self.topologies:
            if chips >= num_devices:
                return topo
        have = [c for c, _ in self.topologies]
        raise ValueError(f"target {self.name!r} offers topologies of {have} chips; {num_devices} asked")


# Public spec values, per chip (dense, i.e. without structured sparsity):
# - TPU v5e: 16 GB HBM2, 819 GB/s, 197 TFLOP/s bf16, 394 TOP/s int8 (Google Cloud TPU v5e docs).
# - TPU v6e (Trillium): 32 GB HBM, 1640 GB/s, 918 TFLOP/s bf16, 1836 TOP/s int8 (Google Cloud TPU v6e docs).
# - TPU v5p: 95 GB HBM2e, 2765 GB/s, 459 TFLOP/s bf16, 918 TOP/s int8 (Google Cloud TPU v5p docs).
#   None of these three has an fp8 matrix unit (TPU v7 / Ironwood adds fp8).
# - H100 SXM5 80 GB: HBM3 3.35 TB/s, 989.4 TFLOP/s bf16, 1978.9 TFLOP/s fp8, 1978.9 TOP/s int8 (NVIDIA H100
#   datasheet, dense); memory size as XLA's target config reports it (84942979072 bytes, 79.1 GiB).
# The TPU "GB" of HBM are GiB (v5e: 16 GiB). Bandwidths are taken in decimal units as published.
GIB = 2**30
TARGETS: dict[str, Target] = {
    "tpu-v5e": Target("tpu-v5e", TPU, "pallas_tpu", "TPU v5 lite", 16 * GIB, 819e9, 197e12, 394e12, None,
                      ((4, "v5e:2x2"), (8, "v5e:2x4"), (16, "v5e:4x4"), (32, "v5e:4x8"))),
    "tpu-v6e": Target("tpu-v6e", TPU, "pallas_tpu", "TPU v6 lite", 32 * GIB, 1640e9, 918e12, 1836e12, None,
                      ((4, "v6e:2x2"), (8, "v6e:2x4"), (16, "v6e:4x4"))),
    "tpu-v5p": Target("tpu-v5p", TPU, "pallas_tpu", "TPU v5", 95 * GIB, 2765e9, 459e12, 918e12, None,
                      ((4, "v5p:2x2x1"), (8, "v5p:2x2x2"))),
    "h100": Target("h100", CUDA, "pallas_gpu", "NVIDIA H100 80GB HBM3", 84942979072, 3.35e12, 989.4e12,
                   1978.9e12, 1978.9e12, ((1, "1x1x1"), (2, "1x1x2"), (4, "1x1x4"), (8, "1x1x8")),
                   target_config="h100_sxm.txtpb"),
}


def get_target(name: str | Target) -> Target:
    """The :class:`Target` called ``name`` (or ``name`` itself if it is one); ``ValueError`` if unknown."""
    if isinstance(name, Target):
        return name
    if name not in TARGETS:
        raise ValueError(f"unknown compile target {name!r}; expected one of {sorted(TARGETS)}")
    return TARGETS[name]


def target_config_text(target: str | Target) -> str:
    """The GPU target config (text proto) of a CUDA target."""
    tgt = get_target(target)
    if tgt.target_config is None:
        raise ValueError(f"target {tgt.name!r} has no GPU target config")
    return resources.files("pallas_kernels").joinpath("targets_data", tgt.target_config).read_text()


def _check_toolchain(tgt: Target) -> None:
    import importlib.util

    if tgt.platform == TPU:
        if importlib.util.find_spec("libtpu") is None:
            raise ToolchainUnavailableError(
                f"compiling for {tgt.name} needs libtpu: pip install -e \".[aot]\" (or "
                f"\"jax[tpu]=={jax.__version__}\")")
    else:
        missing = [m for m in ("jax_plugins.xla_cuda12", "nvidia.cuda_nvcc") if importlib.util.find_spec(m) is None]
        if missing:
            raise ToolchainUnavailableError(
                f"compiling for {tgt.name} needs the CUDA plugin and ptxas ({', '.join(missing)} missing): "
                f"pip install -e \".[aot]\" (jax-cuda12-plugin / jax-cuda12-pjrt =={jax.__version__}, "
                "nvidia-cuda-nvcc-cu12)")


@functools.cache
def _topology_devices(name: str, topology: str) -> tuple:
    from jax.experimental import topologies

    tgt = TARGETS[name]
    _check_toolchain(tgt)
    # libtpu takes a machine-wide lock on start; a compile-only client touches no TPU, so several
    # processes (e.g. test workers) may load it at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        if tgt.platform == TPU:
            topo = topologies.get_topology_desc(platform="tpu", topology_name=topology)
        else:
            topo = topologies.get_topology_desc(tgt.name, platform="cuda", topology=topology,
                                                target_config=target_config_text(tgt))
    except NotImplementedError as e:  # the CUDA plugin was not registered (its initialisation failed)
        raise ToolchainUnavailableError(
            f"the CUDA plugin offers no topology here ({e}). Without CUDA libraries (cuDNN) its backend "
            "fails to initialise; set JAX_PLATFORMS=cpu before importing jax to use the deviceless "
            "compile") from e
    except Exception as e:
        raise ToolchainUnavailableError(f"cannot build the {topology} topology for {tgt.name}: {e}") from e
    devices = tuple(topo.devices)
    if devices[0].device_kind != tgt.device_kind:
        raise ToolchainUnavailableError(
            f"{tgt.name}: topology {topology} gave {devices[0].device_kind!r} devices, expected {tgt.device_kind!r}")
    return devices


def target_devices(target: str | Target, num_devices: int = 1) -> list:
    """``num_devices`` compile-only devices of ``target`` (e.g. 8 chips of ``tpu-v5e`` from a ``v5e:2x4``).

    Args:
      target: a :data:`TARGETS` name or a :class:`Target`.
      num_devices: chips wanted; the smallest topology holding them is built and its first
        ``num_devices`` devices are returned.

    Returns:
      A list of ``jax.Device`` that can only be compiled for (placing data on them fails).

    Raises:
      ToolchainUnavailableError: libtpu / the CUDA plugin is not installed or cannot initialise.
    """
    tgt = get_target(target)
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    return list(_topology_devices(tgt.name, tgt.topology_for(num_devices))[:num_devices])


def target_mesh(target: str | Target, shape: tuple[int, ...], axis_names: tuple[str, ...]) -> jax.sharding.Mesh:
    """A ``Mesh`` of ``prod(shape)`` compile-only devices of ``target`` with the given axis names."""

    devices = target_devices(target, int(np.prod(shape)))
    return jax.sharding.Mesh(np.array(devices, dtype=object).reshape(shape), axis_names)


def toolchain_available(target: str | Target) -> bool:
    """Whether :func:`target_devices` works for ``target`` here (builds its smallest topology once)."""
    try:
        target_devices(target)
    except ToolchainUnavailableError:
        return False
    return True
