"""Accelerators as data: what `python -m dlrm_jax.compile --target=NAME` builds for.

A target is a kind of chip and a number of them: its compile-only devices
(`Target.devices`, from `jax.experimental.topologies`: no accelerator needed),
its memory per device (the planner's budget) and the peak figures of the
roofline model (`dlrm_jax.compile`). Each chip's figures name their source: the
vendors' published data sheets, read 2026-12-07. They are peaks a program does not
reach; every time derived from them is a lower bound, a model and not a
measurement.

Names: TPU slices as Google Cloud names them (`v5p-8`: 8 TensorCores, 4 chips
of 2 cores each, one device per chip; `v5e-8`, `v6e-8`: 8 chips); NVIDIA as
`h100x8` (8 GPUs of one host), `h200x1`, `b200x8`; `cpu` (this host's devices).
The NVIDIA targets' descriptions for XLA's GPU compiler are XLA's own
(`src/dlrm_jax/gpu_targets/*.txtpb`, see its README).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from dlrm_jax.config import ConfigError

GiB = 2**30
GPU_TARGETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_targets")


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator's figures (per device: a TPU chip, a GPU).

  `interconnect_bytes_per_s` is the chip's bandwidth to its peers in one
  direction (TPU: ICI, all links; NVIDIA: NVLink within a host), the rate the
  roofline charges for the bytes a device sends in collectives. `flops_f32` is
  the rate of float32 matrix products at JAX's default precision: one bfloat16
  pass on TPU, TF32 tensor cores on NVIDIA (dense, no sparsity).
  """

  name: str
  platform: str  # "tpu" or "cuda" (what jax.experimental.topologies takes)
  device_kind: str  # what the compiled devices report: checked against them
  memory_bytes: int
  hbm_bytes_per_s: float
  flops_bf16: float
  flops_f32: float
  interconnect_bytes_per_s: float
  source: str
  dims: int = 2  # TPU: the topology's dimensions (v5p's torus is 3-D)
  cores_per_chip: int = 1  # TPU: TensorCores a slice name counts per chip (v5p: 2)
  chip_config_name: str = "default"
  gpu_target: str = ""  # NVIDIA: the file in gpu_targets/

  def flops(self, dtype: str) -> float:
    """Peak matrix FLOP/s for a compute dtype ("float32", "bfloat16")."""
    return self.flops_f32 if dtype == "float32" else self.flops_bf16


CHIPS: dict[str, Chip] = {c.name: c for c in (
    Chip("v5e", "tpu", "TPU v5 lite", memory_bytes=16 * GiB, hbm_bytes_per_s=819e9,
         flops_bf16=197e12, flops_f32=197e12, interconnect_bytes_per_s=1600e9 / 8,
         source="Google Cloud TPU documentation, 'TPU v5e': 16 GiB HBM2, 819 GB/s, "
                "197 TFLOP/s bf16, ICI 1,600 Gbps per chip"),
    Chip("v5p", "tpu", "TPU v5", memory_bytes=95 * GiB, hbm_bytes_per_s=2765e9,
         flops_bf16=459e12, flops_f32=459e12, interconnect_bytes_per_s=4800e9 / 8,
         dims=3, cores_per_chip=2, chip_config_name="megacore",
         source="Google Cloud TPU documentation, 'TPU v5p': 95 GiB HBM2e, 2,765 GB/s, "
                "459 TFLOP/s bf16, ICI 4,800 Gbps per chip"),
    Chip("v6e", "tpu", "TPU v6 lite", memory_bytes=32 * GiB, hbm_bytes_per_s=1640e9,
         flops_bf16=918e12, flops_f32=918e12, interconnect_bytes_per_s=3584e9 / 8,
         source="Google Cloud TPU documentation, 'TPU v6e': 32 GiB HBM, 1,640 GB/s, "
                "918 TFLOP/s bf16, ICI 3,584 Gbps per chip"),
    Chip("h100", "cuda", "NVIDIA H100 80GB HBM3", memory_bytes=84942979072,
         hbm_bytes_per_s=3.35e12, flops_bf16=989e12, flops_f32=494e12,
         interconnect_bytes_per_s=450e9, gpu_target="h100_sxm.txtpb",
         source="NVIDIA H100 Tensor Core GPU data sheet (SXM): 80 GB HBM3 (XLA's "
                "description: 84,942,979,072 bytes), 3.35 TB/s, 989 TFLOP/s bf16 and 494 "
                "TF32 dense, NVLink 900 GB/s both directions"),
    Chip("h200", "cuda", "NVIDIA H200 141GB HBM3e", memory_bytes=151397597184,
         hbm_bytes_per_s=4.8e12, flops_bf16=989e12, flops_f32=494e12,
         interconnect_bytes_per_s=450e9, gpu_target="h200.txtpb",
         source="NVIDIA H200 Tensor Core GPU data sheet (SXM): 141 GB HBM3e (XLA's "
                "description: 151,397,597,184 bytes), 4.8 TB/s, 989 TFLOP/s bf16 and 494 "
                "TF32 dense, NVLink 900 GB/s both directions"),
    Chip("b200", "cuda", "NVIDIA B200", memory_bytes=191514411008,
         hbm_bytes_per_s=8e12, flops_bf16=2.25e15, flops_f32=1.1e15,
         interconnect_bytes_per_s=900e9, gpu_target="b200.txtpb",
         source="NVIDIA HGX B200 data sheet, per GPU: 180 GB HBM3e (XLA's description: "
                "191,514,411,008 bytes), 8 TB/s, 2.25 PFLOP/s bf16 and 1.1 TF32 dense, "
                "NVLink 5 1.8 TB/s both directions"),
)}


@dataclasses.dataclass(frozen=True)
class Target:
  """A number of one chip: `devices` of it, in `slices` TPU slices (1 elsewhere)."""

  name: str
  chip: Chip | None  # None: this host's CPU devices
  devices: int
  slices: int = 1

  @property
  def memory_bytes(self) -> int | None:
    return None if self.chip is None else self.chip.memory_bytes

  def topology(self) -> str:
    """The topology string `jax.experimental.topologies` takes: chips per slice laid
    out as TPU slices are ("2x2x1", "2x4", ...), or NVIDIA's "1xHOSTSxGPUS"."""
    if self.chip.platform == "cuda":
      return f"1x1x{self.devices}"
    return "x".join(map(str, tpu_shape(self.devices // self.slices, self.chip.dims)))

  def compile_devices(self) -> list:
    """The target's compile-only devices (no accelerator needed); this host's devices
    for `cpu`. ConfigError, in a line, where the compiler for the chip is missing."""
    import jax

    if self.chip is None:
      return jax.devices("cpu")[:self.devices or None]
    from jax.experimental import topologies

    chip = self.chip
    try:
      if chip.platform == "tpu":
        per_slice = tpu_shape(self.devices // self.slices, chip.dims)
        host = tuple(min(2, s) for s in per_slice[:2]) + (1,)
        desc = topologies.get_topology_desc(
            topology_name=f"{chip.name}:{self.topology()}", platform="tpu",
            chip_config_name=chip.chip_config_name, chips_per_host_bounds=host,
            num_slices=self.slices)
      else:
        with open(os.path.join(GPU_TARGETS, chip.gpu_target)) as f:
          config = f.read()
        desc = topologies.get_topology_desc(platform="cuda", target_config=config,
                                            topology=self.topology())
    except Exception as e:  # no libtpu / CUDA plugin, or one that does not match jaxlib
      raise ConfigError(f"--target={self.name}: cannot describe {chip.name} devices here "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        f"{INSTALL[chip.platform]}") from None
    devices = list(desc.devices)
    kinds = {d.device_kind for d in devices}
    if kinds != {chip.device_kind} or len(devices) != self.devices:
      raise ConfigError(f"--target={self.name}: the compiler described {len(devices)} "
                        f"devices of kind {sorted(kinds)}, expected {self.devices} of "
                        f"{chip.device_kind!r}")
    return devices


INSTALL = {
    "tpu": "pip install libtpu (with jax >= 0.12 on Python >= 3.12)",
    "cuda": "pip install jax-cuda13-plugin==<your jaxlib's version> (the plugin alone, "
            "without CUDA's libraries, compiles for a described GPU)",
}


def tpu_shape(chips: int, dims: int) -> tuple[int, ...]:
  """The chips of a TPU slice as the topology lays them out: 2-D near-square for
  v5e/v6e (8 -> 2x4, 64 -> 8x8), 3-D from 2x2x1 for v5p (16 -> 2x2x4, 64 -> 4x4x4)."""
  if chips < 1 or chips & (chips - 1):
    raise ConfigError(f"a TPU slice has a power of two of chips, not {chips}")
  if dims == 2 or chips <= 4:
    a = 2 ** (int(math.log2(chips)) // 2)
    return (a, chips // a) + (1,) * (dims - 2)
  shape = [2, 2, 1]
  for _ in range(int(math.log2(chips)) - 2):
    # double the smallest side, the last of equal ones: 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8
    i = max(k for k in range(3) if shape[k] == min(shape))
    shape[i] *= 2
  return tuple(shape)


_NAME = re.compile(r"^(?:(v5e|v5p|v6e)-(\d+)|(h100|h200|b200)x(\d+)|(cpu)(?:x(\d+))?)$")


def get(name: str, slices: int = 1) -> Target:
  """The target a `--target` name gives; ConfigError listing the forms for another."""
  m = _NAME.match(name.strip().lower())
  if not m or slices < 1:
    raise ConfigError(f"--target={name!r} (slices {slices}) is not a target: "
                      f"{', '.join(EXAMPLES)} (any power of two of TPU cores or chips, "
                      "1-8 GPUs)")
  tpu, tpu_n, gpu, gpu_n, _, cpu_n = m.groups()
  if tpu:
    chip = CHIPS[tpu]
    if int(tpu_n) % chip.cores_per_chip:
      raise ConfigError(f"--target={name}: {tpu} slices count {chip.cores_per_chip} cores "
                        "a chip")
    chips = int(tpu_n) // chip.cores_per_chip
    tpu_shape(chips, chip.dims)  # a power of two
    return Target(name, chip, chips * slices, slices)
  if slices != 1:
    raise ConfigError(f"--slices={slices}: only TPU targets have slices")
  if gpu:
    if not 1 <= int(gpu_n) <= 8:
      raise ConfigError(f"--target={name}: 1 to 8 GPUs (one host)")
    return Target(name, CHIPS[gpu], int(gpu_n))
  return Target(name, None, int(cpu_n or 0))


def chip_of(device_kind: str) -> Chip | None:
  """The chip whose devices report `device_kind` (None for CPUs and unknown kinds)."""
  return next((c for c in CHIPS.values() if c.device_kind == device_kind), None)


EXAMPLES = ("v5e-4", "v5p-8", "v5p-64", "v6e-8", "h100x8", "h200x1", "h200x8", "b200x8",
            "cpu")
