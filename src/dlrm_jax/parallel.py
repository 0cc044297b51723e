"""Devices, meshes and processes: where a training run's arrays live.

One `jax.sharding.Mesh` serves the whole step. By default it is 1-D (axis
"shard") over every device, every device on both roles as in the paper: the
batch is split over it, dense parameters are replicated on it, embedding tables
are sharded over it. With `mesh.replicas = R > 1` it is 2-D ("replica",
"shard"): the batch is split over all devices, tables over "shard" within each
of the R replica groups.

Multi-host: `initialize_distributed` calls `jax.distributed.initialize` from
the config or the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID); each process then feeds only its own rows of every global
batch (`global_batch`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from dlrm_jax.config import ConfigError
from dlrm_jax.specs import DistributedSpec, MeshSpec


@dataclasses.dataclass(frozen=True)
class MeshAxes:
  """Names of the mesh axes: the one tables are split over and an optional replica axis."""

  shard: str = "shard"
  replica: str | None = None

  @property
  def batch(self) -> tuple[str, ...]:
    """Axes the batch is split over (all of them)."""
    return (self.shard,) if self.replica is None else (self.replica, self.shard)


def initialize_distributed(dist: DistributedSpec) -> None:
  """Joins a multi-process run when the spec or the environment asks for one.

  `distributed.coordinator_address` (or JAX_COORDINATOR_ADDRESS) turns it on;
  the process count and id come from the spec when set (>= 0), otherwise from
  the environment or the cluster (SLURM, TPU pods, ...). Does nothing in a
  single-process run or when already initialised.
  """
  address = dist.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if not address or jax.distributed.is_initialized():
    return
  kwargs = {"coordinator_address": address}
  if dist.num_processes > 0:
    kwargs["num_processes"] = dist.num_processes
  if dist.process_id >= 0:
    kwargs["process_id"] = dist.process_id
  # Collectives between processes' CPU devices (a setting of the CPU backend only;
  # asking which backend is the default would start it too early).
  jax.config.update("jax_cpu_collectives_implementation", dist.cpu_collectives)
  jax.distributed.initialize(**kwargs)
  _no_persistent_cache_on_cpu_collectives()
  # Gloo gives processes 30 s to meet when a group of devices first
  # communicates; set up the groups used most (all devices, and one device per
  # process) now, while the processes are in step, rather than at the first
  # train step, which processes may reach a compile apart.
  multihost_utils.sync_global_devices("dlrm_jax: start")
  multihost_utils.assert_equal(np.int32(jax.process_count()), "dlrm_jax: process count")


def _no_persistent_cache_on_cpu_collectives() -> None:
  """Turns JAX's persistent compilation cache off in a multi-process run on CPU devices.

  With jax/jaxlib 0.12.1, a program with cross-process collectives that the processes
  load from the persistent cache (JAX_COMPILATION_CACHE_DIR), rather than compile,
  never finishes on CPU devices: every process waits in its first gloo all-gather
  (seen with a 2-process, 2-device `jit` of one resharding, its second run; 0.10.2
  runs it). No upstream report of it was found; a resumed multi-process run met it
  whenever the first run had filled the cache. Compiling again costs seconds on CPU.
  """
  cached = jax.config.jax_compilation_cache_dir and jax.config.jax_enable_compilation_cache
  if not cached or jax.default_backend() != "cpu":
    return
  persistent_cache_off()
  logging.getLogger("dlrm_jax").info(
      "the persistent compilation cache is off in this multi-process CPU run (a program "
      "loaded from it hangs in its first collective with jax %s)", jax.__version__)


def persistent_cache_off() -> None:
  """JAX's persistent compilation cache off from the next compile on (also where this
  process has already compiled: the cache is read again)."""
  from jax.experimental.compilation_cache import compilation_cache

  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()


def cpu_unless_accelerator() -> None:
  """JAX on the CPU where this machine has no TPU chip and no NVIDIA GPU, JAX_PLATFORMS is
  unset, and the only accelerator plugins installed are libtpu and CUDA's (the compile
  tool's, `dlrm_jax.compile`): JAX would otherwise start them, and they print start-up
  warnings (libtpu) or a traceback (a CUDA plugin without CUDA's libraries) on every run
  though the run is on the CPU either way. For the command-line entry points; a library
  user's process is left as JAX configures it."""
  import importlib.metadata
  import pkgutil

  if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms:
    return
  try:
    import jax_plugins
    plugins = {m.name for m in pkgutil.iter_modules(jax_plugins.__path__)}
  except ImportError:
    plugins = set()
  plugins |= {e.name for e in importlib.metadata.entry_points(group="jax_plugins")}
  if any("cuda" not in name for name in plugins):
    return  # another accelerator's plugin (ROCm, Metal, ...): JAX decides
  try:
    from jax._src import hardware_utils  # private: guarded
    tpu_chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
    nvidia = hardware_utils.has_visible_nvidia_gpu()
  except (ImportError, AttributeError, OSError):
    return
  if not tpu_chips and not nvidia:
    jax.config.update("jax_platforms", "cpu")


def make_mesh(spec: MeshSpec, devices: list | None = None) -> tuple[Mesh, MeshAxes]:
  """The mesh the spec asks for: `num_devices` (0: all) of `devices` (default: those of
  `platform`, "" the default backend's), `replicas`, `axis_types`. `devices` may be a
  described accelerator's compile-only devices (`dlrm_jax.targets`)."""
  count, replicas = spec.num_devices, spec.replicas
  if devices is None:
    try:
      devices = jax.devices(spec.platform or None)
    except RuntimeError as e:
      raise ConfigError(f"mesh.platform={spec.platform!r}: {e}") from None
  if count > len(devices):
    raise ConfigError(f"mesh.num_devices={count}, but there are {len(devices)} devices "
                      "(0 uses them all)")
  count = count or len(devices)
  if jax.process_count() > 1 and count != len(devices):
    raise ConfigError(f"mesh.num_devices={count}: a multi-process run uses every device "
                      f"({len(devices)}); leave it at 0")
  axis_type = AxisType.Explicit if spec.axis_types == "explicit" else AxisType.Auto
  if replicas < 1 or count % replicas:
    raise ConfigError(f"mesh.replicas={replicas} must be >= 1 and divide the number of "
                      f"devices ({count})")
  if replicas == 1:
    axes = MeshAxes()
    mesh = jax.make_mesh((count,), (axes.shard,), (axis_type,), devices=devices[:count])
  else:
    axes = MeshAxes(replica="replica")
    mesh = jax.make_mesh((replicas, count // replicas), (axes.replica, axes.shard),
                         (axis_type,) * 2, devices=devices[:count])
  return mesh, axes


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def process_rows(sharding: NamedSharding, global_size: int) -> slice:
  """The rows of a batch-sharded array that this process's devices hold."""
  index_map = sharding.addressable_devices_indices_map((global_size,))
  starts = [idx[0].start or 0 for idx in index_map.values()]
  stops = [global_size if idx[0].stop is None else idx[0].stop for idx in index_map.values()]
  return slice(min(starts), max(stops))


def global_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """A host batch -> global arrays split on their leading axis by `sharding`.

  `batch` holds either the whole global batch or, in a multi-process run, only
  this process's rows (those `process_rows` names); every process passes its
  part and gets handles to the same global arrays. Arrays already placed are
  passed through.
  """
  out = {}
  for name, value in batch.items():
    spec = P(*sharding.spec, *([None] * (np.ndim(value) - 1)))
    s = NamedSharding(sharding.mesh, spec)
    if jax.process_count() == 1:
      out[name] = jax.device_put(value, s)  # a no-op for arrays already placed so
    elif isinstance(value, jax.Array):
      out[name] = value  # already global
    else:
      value = np.asarray(value)
      global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
      out[name] = jax.make_array_from_process_local_data(s, value, global_shape)
  return out


def local_rows(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, np.ndarray]:
  """This process's rows of a global host batch (all of it in a single-process run)."""
  if jax.process_count() == 1 or any(isinstance(v, jax.Array) for v in batch.values()):
    return batch
  size = next(iter(batch.values())).shape[0]
  rows = process_rows(sharding, size)
  return {k: v[rows] for k, v in batch.items()}


_barrier_ids = itertools.count()


def barrier(name: str, timeout_s: int = 3600) -> None:
  """Waits until every process of a multi-process run gets here; a no-op in one process.

  It waits on the coordination service, not on a device collective, so it has
  no 30 s limit (gloo gives a collective's participants 30 s to meet).
  Every process must pass the same barriers in the same order.
  """
  if jax.process_count() == 1:
    return
  from orbax.checkpoint import multihost

  key = f"dlrm_jax:{name}:{next(_barrier_ids)}"
  multihost.get_barrier_sync_fn()(key=key, timeout_ms=timeout_s * 1000)


class CompileThenMeet:
  """A jitted function whose processes start each new program together.

  In a multi-process run, each process compiles a program on its own, and a
  loaded host can finish it minutes after another; the first to run it would
  then wait in its first collective, and gloo gives up after 30 s. So on the
  first call with new argument shapes every process compiles ahead of time,
  then waits at a `barrier`, then runs. One process: a plain call.
  """

  def __init__(self, jitted: Callable, name: str):
    self.jitted, self.name = jitted, name
    self._compiled: set = set()

  def __call__(self, *args) -> Any:
    if jax.process_count() > 1:
      key = tuple((np.shape(x), str(getattr(x, "dtype", type(x))))
                  for x in jax.tree.leaves(args))
      if key not in self._compiled:
        self.jitted.lower(*args).compile()  # the call below reuses this executable
        barrier(f"{self.name} compiled")
        self._compiled.add(key)
    return self.jitted(*args)


def gather_to_host(x: jax.Array) -> np.ndarray:
  """The whole value of a (possibly multi-process) global array, on every process."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def exit_without_teardown(status: int = 0) -> None:
  """Ends a process whose work is done (with exit `status`) without the interpreter's
  teardown, in which a native library's exit handlers sometimes abort ("terminate called
  without an active exception", exit status 134). Leaves a multi-process run first, as
  the skipped exit handlers would have; flushes the standard streams and absl's log."""
  import sys

  from absl import logging

  if jax.process_count() > 1:
    jax.distributed.shutdown()
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)
